"""The round plan: which task each optimizer step trains, where rounds end, the learning-rate
factor of every step, and the order in which examples are drawn. Pure Python, deterministic."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALL_TASKS = -1  # the task of a parallel step: every task trains in it


@dataclass(frozen=True)
class Step:
    round: int
    task: int  # ALL_TASKS in the parallel schedule
    local_index: int  # the task's step number within the round (0-based)
    local_steps: int  # the task's steps in the round


@dataclass
class RoundPlan:
    tasks: list[str]
    steps_per_task: list[int]  # optimizer steps of each task in each round
    rounds: int  # merges: num_rounds for many-shot, 1 for post-hoc
    schedule: str = "sequential"
    processes: int = 1  # task_parallel: the processes that split the tasks between them
    steps: list[Step] = field(init=False)  # task_parallel: process 0's steps
    round_ends: list[int] = field(init=False)  # global step counts after which a merge happens
    # task_parallel: each process's tasks (task t belongs to process t % processes) and steps.
    process_tasks: list[list[int]] = field(init=False)
    process_steps: list[list[Step]] = field(init=False)

    def __post_init__(self) -> None:
        self.steps, self.round_ends = [], []
        self.process_tasks = [list(range(len(self.tasks)))]
        if self.schedule == "task_parallel":
            self._task_parallel()
            return
        if self.schedule == "parallel":
            if len(set(self.steps_per_task)) != 1:
                raise ValueError(
                    f"The parallel schedule trains every task in every step, so tasks need equal steps per "
                    f"round; got {dict(zip(self.tasks, self.steps_per_task))}. Set local_steps."
                )
            steps = self.steps_per_task[0]
            for r in range(self.rounds):
                self.steps.extend(Step(r, ALL_TASKS, j, steps) for j in range(steps))
                self.round_ends.append(len(self.steps))
            return
        for r in range(self.rounds):
            order = self._round_order()
            counters = [0] * len(self.tasks)
            for task in order:
                self.steps.append(Step(r, task, counters[task], self.steps_per_task[task]))
                counters[task] += 1
            self.round_ends.append(len(self.steps))

    def _task_parallel(self) -> None:
        """Each process trains its own tasks one after another (sequential within the process), all
        processes in lockstep, so a round ends on every process at the same global step."""
        count = len(self.tasks)
        if count % self.processes:
            raise ValueError(
                f"task_schedule='task_parallel' splits the tasks evenly between processes: {count} tasks "
                f"cannot be split between {self.processes} processes. Use a process count dividing {count}."
            )
        self.process_tasks = [list(range(p, count, self.processes)) for p in range(self.processes)]
        lengths = {sum(self.steps_per_task[t] for t in tasks) for tasks in self.process_tasks}
        if len(lengths) != 1:
            raise ValueError(
                "task_schedule='task_parallel' needs the same optimizer steps per round on every process; "
                f"got {dict(zip(self.tasks, self.steps_per_task))} per task. Set local_steps."
            )
        self.process_steps = [[] for _ in range(self.processes)]
        for r in range(self.rounds):
            for p, tasks in enumerate(self.process_tasks):
                for t in tasks:
                    n = self.steps_per_task[t]
                    self.process_steps[p].extend(Step(r, t, j, n) for j in range(n))
            self.round_ends.append(len(self.process_steps[0]))
        self.steps = self.process_steps[0]

    def owner(self, task: int) -> int:
        """The process that trains ``task`` (task_parallel; 0 in every other schedule)."""
        return task % self.processes if self.schedule == "task_parallel" else 0

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

    def step(self, global_step: int, process: int = 0) -> Step:
        """The step ``global_step`` of ``process`` (every process has the same steps except in
        task_parallel)."""
        steps = self.process_steps[process] if self.schedule == "task_parallel" else self.steps
        return steps[min(global_step, len(steps) - 1)]

    def lr_factor(self, global_step: int, mode: str, process: int = 0) -> float:
        """``linear``: decay to 0 within each task's round (no warm-up), as the reference's
        per-round Trainer with ``lr_scheduler_type='linear'``; ``linear_across_rounds``: one decay
        to 0 over each task's steps of all rounds (what an expert trained alone for as many steps
        sees); or ``constant``."""
        if mode == "constant":
            return 1.0
        s = self.step(global_step, process)
        if mode == "linear_across_rounds":
            return max(0.0, 1.0 - (s.round * s.local_steps + s.local_index) / (self.rounds * s.local_steps))
        return max(0.0, 1.0 - s.local_index / s.local_steps)

    def example_order(self, task_ranges: list[range], rows: int, micro_batches: int, seed: int) -> list[int]:
        """Dataset indices in the order the dataloader yields them, ``rows`` per task and micro-batch,
        ``micro_batches`` (accumulation x processes) per optimizer step.

        Each task walks through a fresh seeded permutation of its examples every round (starting
        another when it runs out) and takes ``rows * micro_batches`` of them per step. A
        sequential or interleaved step lays out its task's examples in order; a parallel step
        builds every micro-batch from each task's next ``rows`` examples, tasks in order, so
        every task sees exactly the examples the other schedules give it. A task-parallel step
        gives micro-batch ``m`` of process ``p`` the slot ``m * processes + p`` (accelerate hands
        process p every processes-th micro-batch from p on), filled from p's own task.
        """
        if self.schedule == "task_parallel":
            return self._task_parallel_order(task_ranges, rows, micro_batches // self.processes, seed)
        per_step = rows * micro_batches
        streams: dict[tuple[int, int], list[int]] = {}

        def chunk(round_index: int, task: int, local_index: int) -> list[int]:
            stream = streams.setdefault((round_index, task), [])
            needed = per_step * (local_index + 1)
            if len(stream) < needed:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index * 1009 + task)
                size = len(task_ranges[task])
                while len(stream) < needed:
                    stream.extend(
                        task_ranges[task][i] for i in torch.randperm(size, generator=generator).tolist()
                    )
                    generator.manual_seed(generator.initial_seed() + 7919)
            return stream[per_step * local_index : needed]

        order: list[int] = []
        for s in self.steps:
            if s.task != ALL_TASKS:
                order.extend(chunk(s.round, s.task, s.local_index))
                continue
            chunks = [chunk(s.round, t, s.local_index) for t in range(len(self.tasks))]
            for m in range(micro_batches):
                for task_chunk in chunks:
                    order.extend(task_chunk[m * rows : (m + 1) * rows])
        return order

    def _task_parallel_order(
        self, task_ranges: list[range], rows: int, accumulation: int, seed: int
    ) -> list[int]:
        single = RoundPlan(self.tasks, self.steps_per_task, self.rounds)  # each task's own stream
        streams = single.example_order(task_ranges, rows, accumulation, seed)
        per_step = rows * accumulation
        position = {}  # (round, task, local step) -> where that step's examples sit in `streams`
        for index, s in enumerate(single.steps):
            position[s.round, s.task, s.local_index] = index * per_step
        order: list[int] = []
        for g in range(len(self.steps)):
            chunks = []
            for p in range(self.processes):
                s = self.process_steps[p][g]
                start = position[s.round, s.task, s.local_index]
                chunks.append(streams[start : start + per_step])
            for m in range(accumulation):
                for chunk in chunks:
                    order.extend(chunk[m * rows : (m + 1) * rows])
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
