"""Sanity checks of the maps: gradient check, model randomization, deletion/insertion faithfulness."""
