"""`python -m shipyard`: the same command line as the `shipyard` script."""

from shipyard.cli import main

if __name__ == "__main__":  # not when a dask worker process re-imports the main module
    main()
