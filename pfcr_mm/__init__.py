"""pfcr_mm: progressive fine-to-coarse reconstruction PTQ for vision transformers."""

__version__ = "0.1.0"
