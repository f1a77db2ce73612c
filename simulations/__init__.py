"""Experiment runners and the ``fed-unlearn`` CLI."""
