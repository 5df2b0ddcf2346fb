"""One module per pipeline stage, each declaring a `STAGE` (base.py); the runner plans and runs them."""
