"""The order in which a run visits its records: epoch after epoch, each a seeded permutation.

A pure function of (number of records, seed, position), so a resumed run, every process of a
multi-process run and a rerun all agree on which record comes at which step without storing it.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_records: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator).tolist()


def data_order(num_records: int, seed: int, position: int) -> int:
    """Record index at stream position `position`: epochs are successive seeded permutations."""
    epoch, offset = divmod(position, num_records)
    return _epoch_permutation(num_records, seed, epoch)[offset]
