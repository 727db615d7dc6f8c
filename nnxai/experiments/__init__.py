"""Experiments on explained runs: synthetic lesions, perilesional context."""
