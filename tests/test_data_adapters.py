"""The paper's dataset adapters on small local files that follow the real Hub schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metis_hf.data import TaskSpec, build_task, format_completion, format_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "paper_datasets"


def _rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def _task(dataset, adapter, sizes=(6, 2, 2), **extra):
    train, validation, test = sizes
    spec = TaskSpec(
        name=adapter,
        source="file",
        dataset=str(FIXTURES / dataset),
        adapter=adapter,
        train_size=train,
        validation_size=validation,
        test_size=test,
        **extra,
    )
    return build_task(spec)


def _all_rows(task):
    return [*task.train, *task.validation, *task.test]


def test_tulu_personas_take_the_user_turn_and_the_assistant_reply():
    raw = {
        r["messages"][0]["content"]: r["messages"][1]["content"]
        for r in _rows("tulu-3-sft-personas-instruction-following.jsonl")
    }
    task = _task("tulu-3-sft-personas-instruction-following.jsonl", "tulu3_personas_if")
    rows = _all_rows(task)
    assert len(rows) == 10 and len(task.train) == 6
    for row in rows:
        instruction = row["prompt"].removesuffix("\nAnswer:")
        assert row["completion"] == format_completion(raw[instruction])


def test_numina_uses_problem_and_solution():
    raw = {r["problem"]: r["solution"] for r in _rows("NuminaMath-TIR.jsonl")}
    for row in _all_rows(_task("NuminaMath-TIR.jsonl", "numina_math_tir")):
        assert row["completion"] == format_completion(raw[row["prompt"].removesuffix("\nAnswer:")])


def test_aya_keeps_only_french_spanish_german_russian():
    raw = {format_prompt(r["inputs"]): r["language"] for r in _rows("aya_dataset.jsonl")}
    wanted = {"French", "Spanish", "German", "Russian"}
    usable = sum(r["language"] in wanted for r in _rows("aya_dataset.jsonl"))
    task = _task("aya_dataset.jsonl", "aya", sizes=(usable - 4, 2, 2))
    rows = _all_rows(task)
    assert len(rows) == usable and {raw[r["prompt"]] for r in rows} == wanted
    german = _task("aya_dataset.jsonl", "aya", sizes=(1, 1, 1), adapter_options={"languages": ["German"]})
    assert {raw[r["prompt"]] for r in _all_rows(german)} == {"German"}


def test_safety_mixture_pools_wildguardmix_and_wildjailbreak_by_weight():
    guard, jail = _rows("wildguardmix-wildguardtrain.jsonl"), _rows("wildjailbreak-train.jsonl")
    safe_guard = {
        format_prompt(r["prompt"]) for r in guard if r["response_harm_label"] == "unharmful" and r["response"]
    }
    jail_prompts = {format_prompt(r["adversarial"] or r["vanilla"]) for r in jail}
    spec = TaskSpec(
        name="safety",
        source="file",
        train_size=8,
        validation_size=2,
        test_size=2,
        mixture=[
            {
                "dataset": str(FIXTURES / "wildguardmix-wildguardtrain.jsonl"),
                "adapter": "wildguardmix",
                "weight": 1,
            },
            {"dataset": str(FIXTURES / "wildjailbreak-train.jsonl"), "adapter": "wildjailbreak", "weight": 2},
        ],
    )
    rows = _all_rows(build_task(spec))
    from_guard = [r for r in rows if r["prompt"] in safe_guard]
    from_jail = [r for r in rows if r["prompt"] in jail_prompts]
    assert len(rows) == 12 and len(from_guard) == 4 and len(from_jail) == 8  # 1 : 2
    # adversarial prompts are used where they exist
    adversarial = {format_prompt(r["adversarial"]) for r in jail if r["adversarial"]}
    assert any(r["prompt"] in adversarial for r in from_jail)


@pytest.mark.bad_input
def test_adapter_errors_name_the_task_and_source():
    with pytest.raises(ValueError, match="Unknown dataset adapter 'nope'"):
        _task("aya_dataset.jsonl", "nope")
    with pytest.raises(ValueError, match="'aya'.*no usable example"):
        _task("aya_dataset.jsonl", "aya", adapter_options={"languages": ["Klingon"]})
    with pytest.raises(ValueError, match="too few for validation"):
        _task("NuminaMath-TIR.jsonl", "numina_math_tir", sizes=(1, 8, 8))
    with pytest.raises(ValueError, match="does not fit adapter 'numina_math_tir'|no usable example"):
        _task("aya_dataset.jsonl", "numina_math_tir")
