"""Which task each training batch comes from: batches are drawn per data source (a batch holds one source's rows)
by a task-sampling strategy, from datasets (`MultiTaskSampler`) or streams (`MultiTaskStream`), deterministically
given the seed and epoch, so a resumed run replays the same order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset, Sampler

from validation_mtl import InputError, check_number

from .arguments import SAMPLING_STRATEGIES, check_choice


def sampling_probabilities(sizes: list[int], strategy: str, temperature: float = 2.0) -> np.ndarray:
    """Probability of drawing each source's next batch.

    - `proportional`: p ∝ n (large datasets dominate; small tasks are seen rarely),
    - `temperature`: p ∝ n^(1/T) (T=1 is proportional, T→∞ is uniform),
    - `uniform` / `round_robin`: every source equally often (small datasets repeat many times per epoch).
    """
    check_choice("task_sampling", strategy, SAMPLING_STRATEGIES)
    sizes_array = np.asarray(sizes, dtype=np.float64)
    if (sizes_array <= 0).any():
        raise InputError(f"every source needs at least one training row, got sizes {sizes}")
    if strategy == "proportional":
        weights = sizes_array
    elif strategy == "temperature":
        check_number("sampling_temperature", temperature, minimum=0, open_low=True)
        weights = sizes_array ** (1.0 / temperature)
    else:
        weights = np.ones_like(sizes_array)
    return weights / weights.sum()


class MultiTaskSampler(Sampler[int]):
    """Yields row indices in blocks of `batch_size` that all come from one source, the source of each block drawn
    by the task-sampling strategy. Deterministic given `(seed, epoch)`, so a resumed run replays the same order.

    An epoch has as many batches as iterating every source once (`sum(ceil(n_i / batch_size))`); sources that
    are drawn more often than their size allows are reshuffled and repeated, rarer ones are seen partly.

    Args:
        source_sizes: rows of each source, in the order they are concatenated in the training dataset.
        batch_size: the per-device batch size (each block becomes one batch).
        strategy: one of `SAMPLING_STRATEGIES`.
        temperature: T of the temperature strategy.
        seed: base seed (the Trainer's `seed`).
        num_processes: processes of a distributed run. `accelerate` deals the batches out in turn (batch `i` to
            process `i % num_processes`), so each drawn source gives `num_processes` consecutive batches: at every
            step all processes train the same task. Their forward passes then make the same collective calls
            (a contrastive task's gathered negatives), and the step's gradient is that task's over the global
            batch. The epoch is rounded up to whole steps.
    """

    def __init__(
        self,
        source_sizes: list[int],
        batch_size: int,
        strategy: str = "temperature",
        temperature: float = 2.0,
        seed: int = 42,
        num_processes: int = 1,
    ):
        self.source_sizes = list(source_sizes)
        self.batch_size = batch_size
        self.strategy = strategy
        self.probabilities = sampling_probabilities(self.source_sizes, strategy, temperature)
        self.seed = seed
        self.epoch = 0
        self.num_processes = num_processes
        batches = sum(math.ceil(size / batch_size) for size in self.source_sizes)
        self.num_batches = num_processes * math.ceil(batches / num_processes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batch_sources(self) -> list[int]:
        """The source of each batch of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        count = len(self.source_sizes)
        steps = self.num_batches // self.num_processes
        if self.strategy == "round_robin":
            drawn = [step % count for step in range(steps)]
        else:
            drawn = rng.choice(count, size=steps, p=self.probabilities).tolist()
        return [source for source in drawn for _ in range(self.num_processes)]

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        offsets = np.concatenate([[0], np.cumsum(self.source_sizes)[:-1]]).astype(int)
        orders = [rng.permutation(size) for size in self.source_sizes]
        cursors = [0] * len(self.source_sizes)
        for source in self.batch_sources():
            size = self.source_sizes[source]
            block = []
            while len(block) < self.batch_size:
                if cursors[source] == size:  # source exhausted: reshuffle and go round again
                    orders[source] = rng.permutation(size)
                    cursors[source] = 0
                take = min(self.batch_size - len(block), size - cursors[source])
                block.extend(orders[source][cursors[source] : cursors[source] + take].tolist())
                cursors[source] += take
            for index in block:
                yield int(offsets[source] + index)


class MultiTaskStream(IterableDataset):
    """The streaming counterpart of `MultiTaskSampler`: rows of several sources (`datasets.IterableDataset`s of
    processed rows), yielded in blocks of `batch_size` rows that all come from one source, the source of each block
    drawn by the task-sampling strategy. A source that runs out starts again (reshuffled); nothing is ever
    materialised beyond a shuffle buffer per source. Deterministic given `(seed, epoch)`.

    The size-based strategies (`temperature`, `proportional`) need every source's size (`num_train_rows` for a
    stream without metadata); `uniform` and `round_robin` do not.
    """

    def __init__(self, sources, sizes, batch_size, strategy="temperature", temperature=2.0, seed=42, buffer=1000):
        if None in sizes and strategy in ("temperature", "proportional"):
            raise InputError(
                f"task_sampling '{strategy}' weighs sources by size, and a streamed source has no known size: give "
                "its task `num_train_rows`, or use --task_sampling uniform / round_robin"
            )
        self.sources = [source.shuffle(seed=seed, buffer_size=buffer) for source in sources]
        self.batch_size = batch_size
        self.strategy = strategy
        known = [size if size is not None else 1 for size in sizes]
        self.probabilities = sampling_probabilities(known, strategy, temperature)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def block_sources(self) -> Iterator[int]:
        """The source of each block, endlessly."""
        rng = np.random.default_rng([self.seed, self.epoch, 3])
        for block in itertools.count():
            if self.strategy == "round_robin":
                yield block % len(self.sources)
            else:
                yield int(rng.choice(len(self.sources), p=self.probabilities))

    def __iter__(self) -> Iterator[dict]:
        passes = [0] * len(self.sources)
        iterators = [iter(source) for source in self.sources]
        for source in self.block_sources():
            for _ in range(self.batch_size):
                try:
                    row = next(iterators[source])
                except StopIteration:  # this source ran out: reshuffle it and go round again
                    passes[source] += 1
                    self.sources[source].set_epoch(passes[source])
                    iterators[source] = iter(self.sources[source])
                    row = next(iterators[source])
                yield row
