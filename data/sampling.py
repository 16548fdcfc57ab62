"""Which samples each rank reads, epoch by epoch: shuffled or grouped by modality and length (LLaVA's
group_by_modality_length), the same order on every rank, every rank's share padded to whole optimizer steps."""
from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

import torch

def _even_chunks(indices: list[int], lengths: Sequence[int], n: int) -> list[list[int]]:
    """Split a megabatch into n chunks of equal size, longest samples spread across them."""
    if len(indices) % n:
        return [indices[i::n] for i in range(n)]
    size = len(indices) // n
    chunks: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in indices:
        k = min((j for j in range(n) if len(chunks[j]) < size), key=lambda j: totals[j])
        chunks[k].append(i)
        totals[k] += lengths[i]
    return chunks


def _length_grouped(lengths: Sequence[int], idx: list[int], megabatch: int, world: int, rng: random.Random):
    order = idx[:]
    rng.shuffle(order)
    groups = [sorted(order[i:i + megabatch], key=lambda j: -abs(lengths[j])) for i in range(0, len(order), megabatch)]
    return [_even_chunks(g, [abs(x) for x in lengths], world) for g in groups]


def modality_grouped_order(lengths: Sequence[int], batch_size: int, world_size: int, seed: int) -> list[list[list[int]]]:
    """LLaVA's group_by_modality_length: megabatches (batch x world x accumulation) hold one modality only
    (lengths > 0: with image, < 0: text only), are sorted by length inside and shuffled; the two leftover
    partial megabatches are merged and go last. Returns megabatches, each split into world_size chunks."""
    rng = random.Random(seed)
    megabatch = batch_size * world_size
    mm = [i for i, x in enumerate(lengths) if x > 0]
    lang = [i for i, x in enumerate(lengths) if x < 0]
    mm_groups = _length_grouped(lengths, mm, megabatch, world_size, rng) if mm else []
    lang_groups = _length_grouped(lengths, lang, megabatch, world_size, rng) if lang else []
    last = []
    for groups in (mm_groups, lang_groups):
        if groups and sum(len(c) for c in groups[-1]) < megabatch:
            last += [i for c in groups.pop() for i in c]
    full = mm_groups + lang_groups
    rng.shuffle(full)
    if last:
        full.append(_even_chunks(sorted(last), [abs(x) for x in lengths], world_size))
    return full


class RankSampler(torch.utils.data.Sampler):
    """The indices one rank reads in an epoch: shuffled (or modality-grouped) with a seed of the epoch, the same
    on every rank, then every rank takes its share. Each rank's share is padded, by repeating its first indices,
    to a multiple of `batch_size` (micro-batch x accumulation), so that every rank runs the same whole number of
    optimizer steps (DeepSpeed's collectives need it) and no sample is dropped."""

    def __init__(self, lengths: Sequence[int], batch_size: int, rank: int, world_size: int, seed: int = 0,
                 group_by_modality: bool = False):
        self.lengths = list(lengths)
        if len(self.lengths) < world_size:
            raise ValueError(f"{len(self.lengths)} samples cannot be shared by {world_size} processes")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.group = seed, group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.lengths) / self.world_size)
        return math.ceil(per_rank / self.batch_size) * self.batch_size

    def _indices(self) -> list[int]:
        seed = self.seed + self.epoch
        if self.group:
            mine = [i for chunks in modality_grouped_order(self.lengths, self.batch_size, self.world_size, seed)
                    for i in chunks[self.rank]]
        else:
            order = list(range(len(self.lengths)))
            random.Random(seed).shuffle(order)
            mine = order[self.rank::self.world_size]
        n = len(self)
        while len(mine) < n:
            mine += mine[: n - len(mine)]
        return mine[:n]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())
