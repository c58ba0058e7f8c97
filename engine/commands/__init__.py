"""What the `ftl` command line runs on top of the training core (docs/architecture.md). Nothing in the core imports these."""
