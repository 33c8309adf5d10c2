"""Diagnostics: reports about the batch-norm layers of a model."""

from .inspect import LayerReport, format_table, inspect_model

__all__ = ["LayerReport", "format_table", "inspect_model"]
