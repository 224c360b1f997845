"""Code the tests and the benchmarks share that the product itself never runs (so it is not
shipped in the streamspace package): the RFB client that proves a session streams pixels.

Importable as `streamspace_testing` from tests (pyproject's pytest `pythonpath`) and from
`python -m benchmarks.<name>` (benchmarks/__init__.py puts tests/ on the path)."""
