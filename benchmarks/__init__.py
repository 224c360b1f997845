"""Benchmarks, run from the checkout as `python -m benchmarks.<name>`.

They drive sessions with the RFB client the tests use, which lives in tests/streamspace_testing
(not in the shipped package), so tests/ goes on the import path here, once, for all of them."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
