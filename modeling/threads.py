"""How many threads torch uses for a block of work."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Long chains of small operations (a greedy coreset's 4000 matrix-vector products, LBFGS on a linear head) run on one
# thread: with a second process busy on the other core, two threads made them 2.7-3.5x slower (a 27.5k-patch coreset
# 1.9 s -> 4.5 s, a 4096-row head 0.31 -> 0.83 s), against 1.5x faster on an idle machine (1.83 -> 1.26 s).
SMALL_OPS_THREADS = 1


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) for the block, the previous setting restored after it. The setting is the
    process's: a thread that starts torch work meanwhile gets it too (and keeps it), so this is for work that no other
    thread runs beside (the round's steps; the API's /predict runs ONNX Runtime, not torch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
