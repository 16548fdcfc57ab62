"""Which samples each rank reads, epoch by epoch, as micro-batches of dataset indices ("batch plans").

Every plan gives every rank the same number of micro-batches per epoch (DeepSpeed's collectives need it), the
same order on every rank, and is a pure function of (seed, epoch), so a resumed run reads what an uninterrupted
one would have read.
- `ShuffledBatches`: one dataset, shuffled or grouped by modality and length (LLaVA's group_by_modality_length),
  each rank's share padded to whole optimizer steps.
- `RoundRobinBatches`: several tasks, each with its own batch size, one task per micro-batch, every task's data
  read once per epoch in a task order shuffled with the epoch (VL-T5's multitask round robin)."""
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


class ShuffledBatches:
    """One dataset: a rank's RankSampler share cut into micro-batches of `micro_batch_size`."""

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, accumulation: int, rank: int, world_size: int,
                 seed: int = 0, group_by_modality: bool = False):
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.sampler = RankSampler(lengths, micro_batch_size * accumulation, rank, world_size, seed=seed,
                                   group_by_modality=group_by_modality)

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch_size

    def micro_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        return [indices[i:i + self.micro_batch_size] for i in range(0, len(indices), self.micro_batch_size)]


class RoundRobinBatches:
    """Several tasks in one index space (task k's samples follow task k-1's, in the order of `task_sizes`).

    Per epoch, each task's indices are shuffled with the epoch's seed, padded (by repeating) to a multiple of
    the world size and dealt to the ranks, as DistributedSampler does, then cut into that task's per-rank batch
    size (the last batch may be smaller, as with drop_last=False). The task of each micro-batch follows a list
    holding every task once per batch of it, shuffled with the epoch's seed: every task's data is read once per
    epoch, in proportion to its number of batches. All ranks run the same task at the same step (ZeRO needs the
    same modules on every rank)."""

    def __init__(self, task_sizes: dict[str, int], task_batch_sizes: dict[str, int], rank: int, world_size: int,
                 seed: int = 0, accumulation: int = 1):
        missing = set(task_sizes) - set(task_batch_sizes)
        if missing:
            raise ValueError(f"no batch size for tasks {sorted(missing)}")
        for task, n in task_sizes.items():
            if n < world_size:
                raise ValueError(f"task {task!r}: {n} samples cannot be shared by {world_size} processes")
        self.task_sizes, self.task_batch_sizes = dict(task_sizes), dict(task_batch_sizes)
        self.rank, self.world_size, self.seed, self.accumulation = rank, world_size, seed, accumulation
        self.offsets, start = {}, 0
        for task, n in self.task_sizes.items():
            self.offsets[task] = start
            start += n
        self.micro_batch_size = max(task_batch_sizes[t] for t in task_sizes)

    def batches_per_epoch(self, task: str) -> int:
        return math.ceil(math.ceil(self.task_sizes[task] / self.world_size) / self.task_batch_sizes[task])

    def __len__(self) -> int:
        return sum(self.batches_per_epoch(t) for t in self.task_sizes)

    def task_of(self, index: int) -> str:
        for task in reversed(list(self.task_sizes)):
            if index >= self.offsets[task]:
                return task
        raise IndexError(index)

    def _task_batches(self, task: str, epoch: int) -> list[list[int]]:
        n = self.task_sizes[task]
        order = list(range(n))
        random.Random(f"{self.seed}-{epoch}-{task}").shuffle(order)
        per_rank = math.ceil(n / self.world_size)
        order += order[: per_rank * self.world_size - n]
        mine = [self.offsets[task] + i for i in order[self.rank::self.world_size]]
        size = self.task_batch_sizes[task]
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def micro_batches(self, epoch: int) -> list[list[int]]:
        queues = {t: self._task_batches(t, epoch) for t in self.task_sizes}
        schedule = [t for t in self.task_sizes for _ in range(len(queues[t]))]
        random.Random(f"{self.seed}-{epoch}").shuffle(schedule)
        position = dict.fromkeys(queues, 0)
        out = []
        for task in schedule:
            out.append(queues[task][position[task]])
            position[task] += 1
        return out
