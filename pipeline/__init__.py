"""shipyard's library: feature store, manifest, datasets, models and extraction. No CLI here."""

__version__ = "0.1.0"
