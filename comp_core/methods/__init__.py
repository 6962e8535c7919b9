"""Pruning methods."""
