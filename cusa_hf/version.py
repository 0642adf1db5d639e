"""The cusa-hf version, read by ``setup.py`` and recorded in saved search indexes (``cusa_hf.search``)."""

__version__ = "0.1.0"
