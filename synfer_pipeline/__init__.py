"""SynFER: synthetic facial-expression data, the library layer (no Dagster here)."""

__version__ = "0.1.0"
