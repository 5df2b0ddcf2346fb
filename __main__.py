"""`python -m shipyard`: the same command line as the `shipyard` script."""

from shipyard.cli import main

main()
