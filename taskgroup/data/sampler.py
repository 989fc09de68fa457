"""Which task each multi-task batch comes from: uniform, proportional or temperature sampling.

With n_t training examples per task, the probability of drawing task t for a batch is
  uniform:       p_t = 1 / T_tasks            (the challenge baseline)
  proportional:  p_t = n_t / sum n
  temperature:   p_t proportional to n_t^(1/T)  (T=1 proportional, T -> inf uniform)
Each batch holds one task. Within a task, examples are drawn without replacement from a seeded
permutation, reshuffled when exhausted. The sampler's state is a plain dict so a killed run
resumes on the very same batch sequence.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping

import numpy as np


class SamplingStrategy(enum.StrEnum):
    UNIFORM = "uniform"
    PROPORTIONAL = "proportional"
    TEMPERATURE = "temperature"


def task_probabilities(
    sizes: Mapping[str, int], strategy: SamplingStrategy | str, temperature: float = 2.0
) -> dict[str, float]:
    """p_t per task for a strategy (see the module docstring)."""
    strategy = SamplingStrategy(strategy)
    if not sizes:
        raise ValueError("no tasks to sample from")
    empty = [t for t, n in sizes.items() if n <= 0]
    if empty:
        raise ValueError(f"task {empty[0]!r} has no training examples")
    n = np.array(list(sizes.values()), dtype=np.float64)
    if strategy is SamplingStrategy.UNIFORM:
        weights = np.ones_like(n)
    elif strategy is SamplingStrategy.PROPORTIONAL:
        weights = n
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = n ** (1.0 / temperature)
    p = weights / weights.sum()
    return dict(zip(sizes, p.tolist(), strict=True))


class MultiTaskBatchSampler:
    """An endless stream of ``(task_id, example positions)`` batches, one task per batch."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        strategy: SamplingStrategy | str = SamplingStrategy.UNIFORM,
        temperature: float = 2.0,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        self.probabilities = task_probabilities(self.sizes, strategy, temperature)
        self.seed = seed
        self._tasks = list(self.sizes)
        self._p = np.array([self.probabilities[t] for t in self._tasks])
        self.step = 0
        self._epoch = dict.fromkeys(self._tasks, 0)
        self._cursor = dict.fromkeys(self._tasks, 0)

    def _permutation(self, task_index: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, task_index, epoch])
        return rng.permutation(self.sizes[self._tasks[task_index]])

    def next_batch(self) -> tuple[str, list[int]]:
        """Draw the next batch: the task from p_t, then the task's next examples."""
        rng = np.random.default_rng([self.seed, 1_000_003, self.step])
        ti = int(rng.choice(len(self._tasks), p=self._p))
        task = self._tasks[ti]
        positions: list[int] = []
        take = min(self.batch_size, self.sizes[task])
        while len(positions) < take:
            perm = self._permutation(ti, self._epoch[task])
            cursor = self._cursor[task]
            chunk = perm[cursor : cursor + take - len(positions)].tolist()
            positions.extend(chunk)
            self._cursor[task] = cursor + len(chunk)
            if self._cursor[task] >= len(perm):
                self._epoch[task] += 1
                self._cursor[task] = 0
        self.step += 1
        return task, positions

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": dict(self._epoch), "cursor": dict(self._cursor)}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self._epoch = {t: int(state["epoch"][t]) for t in self._tasks}
        self._cursor = {t: int(state["cursor"][t]) for t in self._tasks}
