"""Input channels by their role (FLAIR, T1), found from dataset.json's channel names."""
from __future__ import annotations

ROLE_ALIASES = {"FLAIR": ("flair",), "T1": ("t1", "mprage")}


def channel_index(channel_names: list[str], role: str) -> int | None:
    """Index of the input channel playing `role` ("FLAIR" or "T1"; T1 also matches MPRAGE), from dataset.json names;
    contrast-enhanced T1 (T1c, Gd) is not T1."""
    for index, name in enumerate(channel_names):
        lowered = name.lower()
        if any(lowered.startswith(alias) for alias in ROLE_ALIASES[role]) and "t1c" not in lowered \
                and "gd" not in lowered:
            return index
    return None
