"""`python -m streamspace.cli`, as the tests and benchmarks start the product."""

from streamspace.cli import main

main()
