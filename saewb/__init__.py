"""SAE Workbench command line and shared workspace."""

__version__ = "0.1.0"
