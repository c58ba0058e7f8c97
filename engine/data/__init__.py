"""Data: sources, tokenization, windows, built-in tasks and instruction formats (docs/architecture.md)."""
