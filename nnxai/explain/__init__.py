"""Explaining a cohort lesion by lesion and the output folder it writes."""
