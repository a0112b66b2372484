"""The round plan: which task each optimizer step trains, where rounds end, the learning-rate
factor of every step, and the order in which examples are drawn. Pure Python, deterministic."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Step:
    round: int
    task: int
    local_index: int  # this task's step number within the round (0-based)
    local_steps: int  # this task's steps in the round


@dataclass
class RoundPlan:
    tasks: list[str]
    steps_per_task: list[int]  # optimizer steps of each task in each round
    rounds: int  # merges: num_rounds for many-shot, 1 for post-hoc
    schedule: str = "sequential"
    steps: list[Step] = field(init=False)
    round_ends: list[int] = field(init=False)  # global step counts after which a merge happens

    def __post_init__(self) -> None:
        self.steps, self.round_ends = [], []
        for r in range(self.rounds):
            order = self._round_order()
            counters = [0] * len(self.tasks)
            for task in order:
                self.steps.append(Step(r, task, counters[task], self.steps_per_task[task]))
                counters[task] += 1
            self.round_ends.append(len(self.steps))

    def _round_order(self) -> list[int]:
        if self.schedule == "sequential":
            return [t for t, n in enumerate(self.steps_per_task) for _ in range(n)]
        order, left = [], list(self.steps_per_task)
        while any(left):  # interleaved: one step per task in turn, skipping finished tasks
            for t in range(len(self.tasks)):
                if left[t]:
                    order.append(t)
                    left[t] -= 1
        return order

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def step(self, global_step: int) -> Step:
        return self.steps[min(global_step, len(self.steps) - 1)]

    def lr_factor(self, global_step: int, mode: str) -> float:
        """Linear decay to 0 within each task's round (no warm-up), as the reference's per-round
        Trainer with ``lr_scheduler_type='linear'``; or constant."""
        if mode == "constant":
            return 1.0
        s = self.step(global_step)
        return max(0.0, 1.0 - s.local_index / s.local_steps)

    def example_order(self, task_ranges: list[range], examples_per_step: int, seed: int) -> list[int]:
        """Dataset indices in the order the dataloader must yield them: for every optimizer step,
        ``examples_per_step`` indices of that step's task. Each task walks through a fresh seeded
        permutation of its examples every round, starting another when it runs out."""
        streams: dict[tuple[int, int], list[int]] = {}
        order: list[int] = []
        for s in self.steps:
            key = (s.round, s.task)
            if key not in streams:
                streams[key] = []
            stream = streams[key]
            needed = examples_per_step * (s.local_index + 1)
            if len(stream) < needed:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + s.round * 1009 + s.task)
                size = len(task_ranges[s.task])
                while len(stream) < needed:
                    stream.extend(task_ranges[s.task][i] for i in torch.randperm(size, generator=generator).tolist())
                    generator.manual_seed(generator.initial_seed() + 7919)
            order.extend(stream[examples_per_step * s.local_index : needed])
        return order


class FixedOrderSampler(torch.utils.data.Sampler[int]):
    """Yields a precomputed index order (the plan's); ``set_epoch`` is accepted and ignored."""

    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        pass
