"""Landmark recognition pipeline: one module per Snakemake stage (see README.md)."""

__version__ = "0.1.0"
