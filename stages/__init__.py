"""One module per pipeline stage: each declares a `SPEC` and a `run(manifest, options)`."""
