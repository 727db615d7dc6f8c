"""The most bytes that autograd graphs hold at any one time inside a block (device-independent)."""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator

import torch


class _Saved:
    """What the graph keeps instead of a saved tensor: its release tells when the graph let go of it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()  # a saved output would otherwise keep its own node alive in a cycle


@contextlib.contextmanager
def peak_graph_bytes() -> Iterator[list[int]]:
    """Yields [peak]: the largest total size of distinct storages that live graphs held at once."""
    holders: Counter = Counter()
    sizes: dict[int, int] = {}
    live, peak = [0], [0]

    def release(key: int) -> None:
        holders[key] -= 1
        if not holders[key]:
            live[0] -= sizes.pop(key)

    def pack(tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not holders[key]:
            sizes[key] = storage.nbytes()
            live[0] += sizes[key]
            peak[0] = max(peak[0], live[0])
        holders[key] += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, release, key)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        yield peak
