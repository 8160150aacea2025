"""Pieces both pipelines share: configuration files, the CLI error wrapper, progress bars, paths."""
