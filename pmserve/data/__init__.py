"""Compact built-in task data shipped with pmserve (licences and attribution: LICENSE-WORDNET, LICENSE-DIGITS,
LICENSE-clinc150)."""
