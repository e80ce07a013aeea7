"""The package version, at the bottom of the package so checkpoints and exports can record it."""

__version__ = "0.1.0"
