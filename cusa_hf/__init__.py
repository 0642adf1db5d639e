"""cusa-hf: CUSA soft-label alignment for Hugging Face image-text retrieval models."""

__version__ = "0.1.0"
