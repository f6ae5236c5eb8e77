"""BaldEagle: train, evaluate and export EAGLE speculative-decoding draft models."""

__version__ = "0.1.0"
