"""Tasks: a name plus train / validation / test splits in one prompt-completion form, and a scorer.

Every split has the columns ``prompt``, ``completion``, ``answer`` (the gold answer text, used for
exact match) and ``entry`` (a JSON string the task's scorer may need, "" when unused). The text
follows the METIS reference code: ``instruction.rstrip() + "\\nAnswer: " + response.strip() + "\\n\\n"``,
split so that the completion starts with the space (BPE tokenizers attach it to the answer's first
token; the concatenated text is the reference's, character for character).

Sources: reasoning-gym generators (disjoint seeds per split), local JSON/JSONL/CSV/Parquet files,
and Hub datasets by id (or a dataset folder laid out like a Hub repo) with a column mapping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Dataset, DatasetDict, load_dataset

from metis_hf.schema import Count, Integer, Number, config_dataclass
from metis_hf.scoring import exact_match

SPLITS = ("train", "validation", "test")
ANSWER_PREFIX = "\nAnswer:"

# A scorer maps (model's answer text, example row) to a score in [0, 1].
Scorer = Callable[[str, Mapping[str, Any]], float]


def format_prompt(instruction: str) -> str:
    return instruction.rstrip() + ANSWER_PREFIX


def format_completion(response: str) -> str:
    return " " + str(response).strip() + "\n\n"


def extract_answer(generated: str) -> str:
    """The answer a model generated after the prompt: the text up to the first blank line."""
    return generated.strip().split("\n\n")[0].strip()


@dataclass
class Task:
    """One task: its splits in canonical form and, where it has one, a scorer."""

    name: str
    train: Dataset
    validation: Dataset
    test: Dataset
    scorer: Scorer | None = None

    def split(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r} for task {self.name!r}; expected one of {SPLITS}.")
        return getattr(self, split)

    def score(self, prediction: str, example: Mapping[str, Any]) -> float:
        """Partial-credit score where the task has a scorer, exact match otherwise."""
        if self.scorer is None:
            return exact_match(prediction, example["answer"])
        return float(self.scorer(prediction, example))


@config_dataclass
class SourceSpec:
    """One dataset of a task's ``mixture`` (e.g. the safety task: WildGuardMix + WildJailbreak)."""

    dataset: str | None = field(default=None, metadata={"help": "Hub id, dataset folder or file path."})
    config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    data_files: dict[str, str] | None = field(default=None, metadata={"help": "Split -> local file."})
    split: str = field(default="train", metadata={"help": "The source split rows are drawn from."})
    adapter: str | None = field(default=None, metadata={"help": "Schema adapter (metis_hf.data_adapters)."})
    adapter_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Adapter options."})
    load_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra datasets.load_dataset keyword arguments."}
    )
    weight: Number = field(default=1.0, metadata={"help": "Share of the task's examples from this source."})


@config_dataclass
class TaskSpec:
    """How to build one task. Recipes list these under ``tasks:``."""

    name: str = field(metadata={"help": "Task name, used in logs, metrics and adapter names."})
    source: Literal["reasoning_gym", "file", "hub"] = field(
        default="reasoning_gym",
        metadata={"help": "'reasoning_gym' (a generator), 'file' (local JSON/JSONL/CSV/Parquet) or 'hub'."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Generator name (default: the task name), a file path, or a Hub dataset id or folder."
        },
    )
    data_files: dict[str, str] | None = field(
        default=None, metadata={"help": "For source 'file': split name -> file path (instead of `dataset`)."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration (subset)."})
    splits: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Canonical split -> the source's split name, e.g. {validation: dev}."},
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Role -> source column. Roles: prompt/completion, instruction/response, messages, "
            "answer. Detected from common names when empty."
        },
    )
    train_size: Count = field(default=1000, metadata={"help": "Training examples (sampled with `seed`)."})
    validation_size: Count = field(
        default=100, metadata={"help": "Validation examples (loss gaps, eval loss)."}
    )
    test_size: Count = field(default=200, metadata={"help": "Test examples (accuracy)."})
    seed: Integer = field(
        default=0, metadata={"help": "Sampling seed; reasoning-gym splits use seed, +1e4, +2e4."}
    )
    generator_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra keyword arguments for the reasoning-gym generator."}
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "Schema adapter for `dataset` (metis_hf.data_adapters), e.g. aya, wildjailbreak."},
    )
    adapter_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Adapter options, e.g. {languages: [French, German]}."}
    )
    load_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra datasets.load_dataset keyword arguments."}
    )
    mixture: list[SourceSpec] = field(
        default_factory=list,
        metadata={"help": "Several sources pooled into one task (instead of `dataset`), by weight."},
    )


def build_task(spec: TaskSpec | Mapping[str, Any]) -> Task:
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec(**spec)
    if spec.source == "reasoning_gym":
        return _reasoning_gym_task(spec)
    if spec.adapter or spec.mixture:
        return _adapted_task(spec)
    return _dataset_task(spec)


def dataset_reference(spec: TaskSpec, split: str, items: int) -> dict[str, Any]:
    """Where ``items`` examples of a task's ``split`` come from, as a card's ``model-index`` names a
    dataset: a Hub id where there is one; a generator with its seed and the number of items
    scored (``--limit`` may cut a split); a local file by the task's name only. The
    task's name is the configuration of a generated or local dataset: one generator may make
    several tasks of a run (other generator_config), and the model-index keys results by it."""
    if spec.source == "reasoning_gym":
        generator = spec.dataset or spec.name
        return {
            "dataset_type": "reasoning-gym",
            "dataset_name": f"reasoning-gym {generator}",
            "dataset_config": spec.name,
            "dataset_split": split,
            "dataset_args": {
                "generator": generator,
                "seed": spec.seed + _SPLIT_SEED_OFFSET[split],
                "size": items,
                **spec.generator_config,
            },
        }
    hub_id = (
        spec.dataset if spec.source == "hub" and spec.dataset and not os.path.exists(spec.dataset) else None
    )
    if hub_id:
        return {
            "dataset_type": hub_id,
            "dataset_name": hub_id,
            "dataset_config": spec.config_name,
            "dataset_split": spec.splits.get(split, split),
        }
    return {
        "dataset_type": "local",
        "dataset_name": f"{spec.name} (local data)",
        "dataset_config": spec.name,
        "dataset_split": split,
    }


def build_tasks(specs: Sequence[TaskSpec | Mapping[str, Any]]) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for spec in specs:
        task = build_task(spec)
        if task.name in tasks:
            raise ValueError(f"Task name {task.name!r} appears twice.")
        tasks[task.name] = task
    if not tasks:
        raise ValueError("No tasks given.")
    return tasks


# --- reasoning-gym ---------------------------------------------------------------------------

_SPLIT_SEED_OFFSET = {"train": 0, "validation": 10_000, "test": 20_000}


def _reasoning_gym_task(spec: TaskSpec) -> Task:
    try:
        import reasoning_gym
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reasoning-gym tasks need `pip install reasoning-gym` (extra `offline`).") from err
    generator = spec.dataset or spec.name
    try:
        scorer_dataset = reasoning_gym.create_dataset(
            generator, size=1, seed=spec.seed, **spec.generator_config
        )
    except Exception as err:
        raise ValueError(f"Task {spec.name!r}: reasoning-gym cannot build {generator!r}: {err}") from err

    rows = _generated_rows(spec) if sys.flags.hash_randomization == 0 else _rows_under_hash_seed_zero(spec)
    splits: dict[str, Dataset] = {}
    for split in SPLITS:
        _require_rows(spec.name, split, rows[split])
        splits[split] = Dataset.from_list(rows[split])

    def score(prediction: str, example: Mapping[str, Any]) -> float:
        return float(scorer_dataset.score_answer(answer=prediction, entry=json.loads(example["entry"])))

    return Task(spec.name, splits["train"], splits["validation"], splits["test"], scorer=score)


def _generated_rows(spec: TaskSpec) -> dict[str, list[dict[str, str]]]:
    """Each split's rows, from the generator with its own seed per split."""
    seen_questions: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:  # train first: later splits drop questions that training has seen
        splits[split], questions = _distinct_items(spec, split, seen_questions)
        seen_questions |= questions
    return splits


# How many items a split draws before it gives up, as multiples of the first draw.
_DRAW_GROWTH = (1, 4, 16)


def _distinct_items(
    spec: TaskSpec, split: str, seen_questions: set[str]
) -> tuple[list[dict[str, str]], set[str]]:
    """The split's first `size` items whose questions are new (to it and to earlier splits), and
    those questions.

    Draws a few extra first; a generator with few distinct questions (number_sequence) draws again,
    larger, from the same seed, so a split that the first draw fills is the same as it always was."""
    size = getattr(spec, f"{split}_size")
    first_draw = _first_draw_size(size)
    for growth in _DRAW_GROWTH:
        items = _draw(spec, split, first_draw * growth)
        rows: list[dict[str, str]] = []
        questions: set[str] = set()
        for item in items:
            question = item["question"]
            if question in seen_questions or question in questions or item["answer"] is None:
                continue
            questions.add(question)
            rows.append(_generated_row(item))
            if len(rows) == size:
                return rows, questions
    raise ValueError(
        f"Task {spec.name!r}: its generator gave only {len(rows)} distinct {split} items (new to "
        f"earlier splits) in {first_draw * _DRAW_GROWTH[-1]} draws, not the {size} asked for: lower "
        f"{split}_size or widen its generator_config."
    )


def _generated_row(item: Mapping[str, Any]) -> dict[str, str]:
    return {
        "prompt": format_prompt(item["question"]),
        "completion": format_completion(item["answer"]),
        "answer": str(item["answer"]).strip(),
        "entry": json.dumps(item, default=str),
    }


def first_drawn_rows(spec: TaskSpec, split: str) -> list[dict[str, str]]:
    """The rows of a generated split's first draw, without the deduplication against other splits:
    a fast superset of the split (when the first draw fills it) for checks that need only the
    prompts' lengths, such as ``metis-hf plan``'s. In-process, so hash-seeded generators may order
    them differently from the split itself."""
    items = _draw(spec, split, _first_draw_size(getattr(spec, f"{split}_size")))
    return [_generated_row(item) for item in items if item["answer"] is not None]


def _first_draw_size(size: int) -> int:
    return size + size // 4 + 8  # a few extra for the questions that repeat


def _draw(spec: TaskSpec, split: str, count: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(
        spec.dataset or spec.name,
        size=count,
        seed=spec.seed + _SPLIT_SEED_OFFSET[split],
        **spec.generator_config,
    )


def _rows_under_hash_seed_zero(spec: TaskSpec) -> dict[str, list[dict[str, str]]]:
    """``_generated_rows`` in a child interpreter under PYTHONHASHSEED=0.

    Some generators draw from Python sets of strings (isomorphic_strings), whose order follows the
    interpreter's hash seed, which Python draws anew for every process: in-process, such a task's
    items would differ from one run (or resumed compare) to the next."""
    code = (
        "import json, sys; from metis_hf.data import TaskSpec, _generated_rows; "
        "json.dump(_generated_rows(TaskSpec(**json.loads(sys.argv[1]))), open(sys.argv[2], 'w'))"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        child = subprocess.run(
            [sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec)), out],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"Task {spec.name!r}: generating its items failed: {last}")
        with open(out) as f:
            return json.load(f)


# --- files and Hub datasets ------------------------------------------------------------------

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_AUTO_COLUMNS = (
    {"prompt": "prompt", "completion": "completion"},
    {"instruction": "instruction", "response": "response"},
    {"instruction": "instruction", "response": "output"},
    {"instruction": "question", "response": "answer"},
    {"instruction": "problem", "response": "solution"},
    {"messages": "messages"},
)


def _load_raw(spec: TaskSpec) -> DatasetDict:
    if spec.source == "file":
        files = spec.data_files or ({"train": spec.dataset} if spec.dataset else None)
        if not files:
            raise ValueError(f"Task {spec.name!r}: source 'file' needs `dataset` (a path) or `data_files`.")
        for split, path in files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Task {spec.name!r}: data file {path!r} does not exist.")
            if os.path.getsize(path) == 0:
                raise ValueError(f"Task {spec.name!r}: split {split!r} is empty (file {path!r}).")
        suffixes = {os.path.splitext(p)[1].lower() for p in files.values()}
        formats = {_FILE_FORMATS.get(s) for s in suffixes}
        if None in formats or len(formats) != 1:
            raise ValueError(
                f"Task {spec.name!r}: cannot read {sorted(suffixes)}; use one of {sorted(_FILE_FORMATS)}."
            )
        return load_dataset(formats.pop(), data_files=dict(files), **spec.load_kwargs)
    if not spec.dataset:
        raise ValueError(f"Task {spec.name!r}: source 'hub' needs `dataset` (a Hub id or a dataset folder).")
    # A Hub id and a local folder laid out like a Hub repo go through the same call.
    return load_dataset(spec.dataset, spec.config_name, **spec.load_kwargs)


def _resolve_columns(spec: TaskSpec, split: str, column_names: Sequence[str]) -> dict[str, str]:
    if spec.columns:
        for role, column in spec.columns.items():
            if column not in column_names:
                raise ValueError(
                    f"Task {spec.name!r}, split {split!r}: column {column!r} (for {role!r}) is missing; "
                    f"the split has {list(column_names)}."
                )
        return dict(spec.columns)
    for candidate in _AUTO_COLUMNS:
        if all(c in column_names for c in candidate.values()):
            return dict(candidate)
    raise ValueError(
        f"Task {spec.name!r}, split {split!r}: no prompt/completion, instruction/response or messages "
        f"columns among {list(column_names)}; set `columns:` in the task spec."
    )


def _instruction_response(columns: Mapping[str, str], row: Mapping[str, Any]) -> tuple[str, str]:
    if "messages" in columns:
        messages = row[columns["messages"]]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat example must end with an assistant message")
        return "\n\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]
    if "prompt" in columns:
        return row[columns["prompt"]], row[columns["completion"]]
    return row[columns["instruction"]], row[columns["response"]]


def _canonical_row(columns: Mapping[str, str], row: Mapping[str, Any]) -> dict[str, str]:
    instruction, response = _instruction_response(columns, row)
    answer = row[columns["answer"]] if "answer" in columns else response
    return {
        "prompt": format_prompt(str(instruction)),
        "completion": format_completion(str(response)),
        "answer": str(answer).strip(),
        "entry": "",
    }


def _dataset_task(spec: TaskSpec) -> Task:
    raw = _load_raw(spec)
    source_splits = {split: spec.splits.get(split, split) for split in SPLITS}
    available = {s: raw[n] for s, n in source_splits.items() if n in raw}
    if "train" not in available:
        raise ValueError(
            f"Task {spec.name!r}: split {source_splits['train']!r} not found; the source has {list(raw)}."
        )
    # Carve validation and test out of train when the source lacks them (seeded, disjoint).
    carve = [s for s in ("validation", "test") if s not in available]
    if carve:
        pool = available["train"].shuffle(seed=spec.seed)
        needed = sum(getattr(spec, f"{s}_size") for s in carve)
        if len(pool) <= needed:
            raise ValueError(
                f"Task {spec.name!r}: split 'train' has {len(pool)} examples, too few to carve "
                f"{' and '.join(carve)} ({needed}) from it and keep any for training."
            )
        start = 0
        for split in carve:
            size = getattr(spec, f"{split}_size")
            available[split] = pool.select(range(start, start + size))
            start += size
        available["train"] = pool.select(range(start, len(pool)))

    splits: dict[str, Dataset] = {}
    for split in SPLITS:
        data = available[split]
        _require_rows(spec.name, split, data)
        columns = _resolve_columns(spec, split, data.column_names)
        data = data.shuffle(seed=spec.seed).select(range(min(getattr(spec, f"{split}_size"), len(data))))
        try:
            rows = [_canonical_row(columns, row) for row in data]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Task {spec.name!r}, split {split!r}: malformed example ({err}).") from err
        splits[split] = Dataset.from_list(rows)
    return Task(spec.name, splits["train"], splits["validation"], splits["test"], scorer=None)


def _adapted_task(spec: TaskSpec) -> Task:
    """A task drawn through schema adapters from one source or a weighted mixture: each source's
    rows are shuffled (seeded) and adapted until its share is filled; the pooled rows are shuffled
    and cut into test, validation and train."""
    from metis_hf.data_adapters import get_adapter

    sources = [dataclasses.replace(m) if isinstance(m, SourceSpec) else SourceSpec(**m) for m in spec.mixture]
    if not sources:
        sources = [
            SourceSpec(
                dataset=spec.dataset,
                config_name=spec.config_name,
                data_files=spec.data_files,
                split=spec.splits.get("train", "train"),
                adapter=spec.adapter,
                adapter_options=spec.adapter_options,
                load_kwargs=spec.load_kwargs,
            )
        ]
    needed = spec.train_size + spec.validation_size + spec.test_size
    total_weight = sum(s.weight for s in sources)
    if total_weight <= 0 or any(s.weight < 0 for s in sources):
        raise ValueError(f"Task {spec.name!r}: mixture weights must be non-negative with a positive sum.")
    pairs: list[tuple[str, str]] = []
    for index, source in enumerate(sources):
        last = index == len(sources) - 1
        quota = needed - len(pairs) if last else round(needed * source.weight / total_weight)
        where = f"Task {spec.name!r}, source {source.dataset or source.data_files!r}"
        adapter = get_adapter(source.adapter) if source.adapter else None
        loader = TaskSpec(
            name=spec.name,
            source=spec.source,
            dataset=source.dataset,
            data_files=source.data_files,
            config_name=source.config_name,
            load_kwargs=source.load_kwargs,
        )
        raw = _load_raw(loader)
        if source.split not in raw:
            raise ValueError(f"{where}: split {source.split!r} not found; it has {list(raw)}.")
        data = raw[source.split].shuffle(seed=spec.seed)
        columns = None if adapter else _resolve_columns(spec, source.split, data.column_names)
        taken = 0
        for row in data:
            if taken == quota:
                break
            try:
                if adapter is not None:
                    pair = adapter(row, source.adapter_options)
                else:
                    pair = tuple(str(x) for x in _instruction_response(columns, row))
            except (KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{where}: row does not fit adapter {source.adapter!r} ({err!r}).") from err
            if pair is not None:
                pairs.append(pair)
                taken += 1
        if taken == 0:
            raise ValueError(f"{where}: no usable example (adapter {source.adapter!r} kept none).")
    if len(pairs) <= spec.validation_size + spec.test_size:
        raise ValueError(
            f"Task {spec.name!r}: {len(pairs)} usable examples, too few for validation "
            f"({spec.validation_size}) and test ({spec.test_size}) and any training."
        )
    random.Random(spec.seed).shuffle(pairs)

    def rows(chunk: list[tuple[str, str]]) -> Dataset:
        return Dataset.from_list(
            [
                {
                    "prompt": format_prompt(instruction),
                    "completion": format_completion(response),
                    "answer": response.strip(),
                    "entry": "",
                }
                for instruction, response in chunk
            ]
        )

    test = rows(pairs[: spec.test_size])
    validation = rows(pairs[spec.test_size : spec.test_size + spec.validation_size])
    train = rows(pairs[spec.test_size + spec.validation_size :])
    return Task(spec.name, train, validation, test, scorer=None)


def _require_rows(task: str, split: str, rows: Sequence[Any] | Dataset) -> None:
    if len(rows) == 0:
        raise ValueError(f"Task {task!r}: split {split!r} is empty.")
