"""Knowledge retention: what a merge costs on tasks no expert trained on, as merged / base.

Multiple-choice tasks in BIG-bench's JSON format (``examples`` of ``input`` and ``target_scores``)
are scored by answer log-likelihood: each choice is appended to the prompt in the training format
(``format_prompt(input)`` then ``" " + choice``) and the choice whose tokens have the highest summed
log-probability is the model's answer (lm-evaluation-harness's ``acc``). Human-written BIG-bench
tasks come from the ``bigbench`` sdist on PyPI (``fetch_bigbench``), read into a cache once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from metis_hf.data import format_prompt
from metis_hf.errors import DataUnavailableError
from metis_hf.models import cache_dir

# The bigbench 1.0.0 sdist on PyPI (358 MB): read for its task files only, never installed (it
# requires tensorflow, t5 and seqio).
BIGBENCH_SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASKS_DIR = "bigbench/benchmark_tasks"


def cache_keyword(model) -> str:
    """The name of the key/value cache argument of the model's forward: transformers 5.x renamed
    `past_key_values` to `cache` (the old name warns). Read from the signature of the model
    under any PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def bigbench_cache() -> Path:
    """Where extracted BIG-bench task files live: ``bigbench/`` in metis-hf's cache."""
    return cache_dir() / "bigbench"


def bigbench_task_file(task: str) -> Path:
    """The cached task.json of a BIG-bench task; a clear error says how to fetch it when absent."""
    path = bigbench_cache() / task / "task.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"BIG-bench task {task!r} is not in {bigbench_cache()}. Fetch it once with "
            f"`python -m metis_hf.evaluation.retention {task}` (downloads BIG-bench's sdist from PyPI, "
            "358 MB, and keeps only the task files), or point `path:` at a task.json."
        )
    return path


def ensure_bigbench(tasks: Sequence[str]) -> dict[str, Path]:
    """The task files of ``tasks``, fetching the ones not yet cached (one download for all)."""
    missing = [t for t in dict.fromkeys(tasks) if not (bigbench_cache() / t / "task.json").is_file()]
    if missing:
        print(
            f"[metis-hf] BIG-bench tasks {', '.join(missing)}: fetching into {bigbench_cache()}", flush=True
        )
        fetch_bigbench(missing)
    return {task: bigbench_task_file(task) for task in tasks}


def extract_bigbench(sdist: str | os.PathLike, tasks: Sequence[str], cache: Path | None = None) -> list[Path]:
    """Copy ``tasks``' task.json files out of a bigbench sdist into the cache (written to a temporary
    name, then moved into place)."""
    cache = cache or bigbench_cache()
    wanted = {task: None for task in tasks}
    with tarfile.open(sdist) as archive:
        for member in archive:
            parts = member.name.split("/")
            if (
                member.isfile()
                and parts[-1] == "task.json"
                and len(parts) >= 3
                and parts[-2] in wanted
                and "/".join(parts[1:-2]) == BIGBENCH_TASKS_DIR
            ):
                wanted[parts[-2]] = archive.extractfile(member).read()
    missing = [task for task, data in wanted.items() if data is None]
    if missing:
        raise ValueError(f"{sdist}: no {BIGBENCH_TASKS_DIR}/<task>/task.json for {', '.join(missing)}.")
    written = []
    for task, data in wanted.items():
        target = cache / task / "task.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(target)
    return written


def fetch_bigbench(tasks: Sequence[str], sdist: str | os.PathLike | None = None) -> list[Path]:
    """Put ``tasks``' task.json files into the cache, from ``sdist`` or from PyPI (the sdist is
    downloaded into a temporary folder, checked against its published sha256, and removed)."""
    if sdist is not None:
        return extract_bigbench(sdist, tasks)
    folder = Path(tempfile.mkdtemp(prefix="metis-hf-bigbench-"))
    try:
        archive = folder / BIGBENCH_SDIST_URL.rsplit("/", 1)[1]
        digest = hashlib.sha256()
        try:
            with (
                urllib.request.urlopen(BIGBENCH_SDIST_URL, timeout=60) as response,
                archive.open("wb") as out,
            ):
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="bigbench sdist") as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except OSError as err:
            raise DataUnavailableError(
                f"Could not download {BIGBENCH_SDIST_URL} ({err}). Download it another way and run "
                f"`python -m metis_hf.evaluation.retention --sdist bigbench-1.0.0.tar.gz {' '.join(tasks)}`."
            ) from err
        if digest.hexdigest() != BIGBENCH_SDIST_SHA256:
            raise DataUnavailableError(
                f"{BIGBENCH_SDIST_URL}: sha256 {digest.hexdigest()} is not the published one."
            )
        return extract_bigbench(archive, tasks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_multiple_choice(path: str | os.PathLike, size: int | None = None, seed: int = 0) -> list[dict]:
    """A BIG-bench-format task file as ``{prompt, choices, correct}`` items (``size`` of them,
    sampled with ``seed``). Only items with one best choice are kept."""
    try:
        data = json.loads(Path(path).read_text())
        examples = data["examples"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a BIG-bench task file ({err}).") from err
    prefix = (data.get("task_prefix") or "").strip()
    items = []
    for example in examples:
        scores = example.get("target_scores")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            continue
        best = max(scores.values())
        if sum(value == best for value in scores.values()) != 1:
            continue
        instruction = f"{prefix}\n{example['input']}" if prefix else str(example["input"])
        items.append(
            {
                "prompt": format_prompt(instruction),
                "choices": [str(c) for c in scores],
                "correct": next(i for i, value in enumerate(scores.values()) if value == best),
            }
        )
    if not items:
        raise ValueError(f"{path}: no multiple-choice example with target_scores and one best choice.")
    if size is not None and size < len(items):
        items = random.Random(seed).sample(items, size)
    return items


@torch.no_grad()
def batch_choice_log_likelihoods(model, tokenizer, items: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Per item, the summed log-probability of each choice's tokens (" " + choice) after its prompt.

    The items' prompts run once, as one left-padded batch; their key/value cache then serves every
    choice of its item, one row per choice: the prompts, not the few choice tokens, are most of the
    work, and one batch of many items keeps the CPU's matrix products wide (docs/benchmarks.md)."""
    device = next(model.parameters()).device
    prompts = [tokenizer(item["prompt"], add_special_tokens=False)["input_ids"] for item in items]
    choices = [
        [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item["choices"]] for item in items
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_width = max(len(p) for p in prompts)
    prompt_mask = torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p in prompts], device=device)
    prompt_ids = torch.tensor([[pad] * (prompt_width - len(p)) + p for p in prompts], device=device)
    prompt_lengths = prompt_mask.sum(-1)
    cache, keyword = DynamicCache(config=model.config), cache_keyword(model)  # the model's layer kinds
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),  # left padding: positions start at 0
        use_cache=True,
        logits_to_keep=1,
        **{keyword: cache},
    )
    first_token_log_probs = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each choice's token 0
    owner = torch.tensor([i for i, item_choices in enumerate(choices) for _ in item_choices], device=device)
    cache.batch_select_indices(owner)  # one cache row per choice
    rows = [c for item_choices in choices for c in item_choices]
    width = max(len(c) for c in rows)
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in rows], device=device)
    choice_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in rows], device=device)
    logits = model(
        input_ids=ids,
        attention_mask=torch.cat([prompt_mask[owner], choice_mask], dim=-1),
        position_ids=prompt_lengths[owner, None] + torch.arange(width, device=device),
        **{keyword: cache},
    ).logits.float()
    # choice token j + 1 is predicted at choice position j
    later = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    totals = [
        float(first_token_log_probs[owner[row], c[0]] + later[row, : len(c) - 1].sum())
        for row, c in enumerate(rows)
    ]
    out_lists, start = [], 0
    for item_choices in choices:
        out_lists.append(totals[start : start + len(item_choices)])
        start += len(item_choices)
    return out_lists


def choice_log_likelihoods(model, tokenizer, prompt: str, choices: Sequence[str]) -> list[float]:
    """The summed log-probability of each choice's tokens (" " + choice) after ``prompt``."""
    return batch_choice_log_likelihoods(model, tokenizer, [{"prompt": prompt, "choices": choices}])[0]


def multiple_choice_accuracy(
    model, tokenizer, items: Sequence[Mapping[str, Any]], desc: str = "", batch_size: int = 16
) -> dict:
    """Accuracy of the highest-likelihood choice, with each item's 0/1 (for intervals) and the
    index of the choice picked (a model that always picks one position measures nothing);
    ``batch_size`` items share a forward pass."""
    was_training = model.training
    model.eval()
    try:
        picks = []
        for start in tqdm(range(0, len(items), batch_size), desc=desc or "retention", leave=False):
            batch = items[start : start + batch_size]
            for scores in batch_choice_log_likelihoods(model, tokenizer, batch):
                picks.append(max(range(len(scores)), key=scores.__getitem__))
    finally:
        model.train(was_training)
    correct = [float(pick == item["correct"]) for pick, item in zip(picks, items)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "items": correct, "picks": picks}


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch BIG-bench task files into metis-hf's cache.")
    parser.add_argument("tasks", nargs="+", help="BIG-bench task names, e.g. date_understanding.")
    parser.add_argument("--sdist", help="A downloaded bigbench-1.0.0.tar.gz (else pip downloads it).")
    args = parser.parse_args(argv)
    for path in fetch_bigbench(args.tasks, args.sdist):
        print(path)


if __name__ == "__main__":
    main()
