"""ftl-engine: distributed fine-tuning of GPT-2-family models. See README.md and ../DESIGN."""

__version__ = "0.1.0"
