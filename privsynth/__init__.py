"""privsynth: differentially private synthetic image datasets with a checkable certificate."""

__version__ = "0.1.0"
