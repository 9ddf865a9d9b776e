"""Compact built-in task data shipped with pmserve (see LICENSE-WORDNET)."""
