"""Lesion instances, lesion-level evaluation and synthetic lesions."""
