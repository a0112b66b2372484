"""`metis-hf train RECIPE.yaml` end to end on a tiny local model and real reasoning-gym tasks."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from metis_hf.commands import main
from tests.conftest import write_tiny_recipe


def _recipe(tmp_path, tokenizer, **training):
    return write_tiny_recipe(tmp_path, tokenizer, training=training)


def test_train_recipe_writes_merged_adapter_and_results(tmp_path, tiny_tokenizer):
    path = _recipe(tmp_path, tiny_tokenizer)
    out = tmp_path / "out"
    assert (
        main(["train", str(path), "--output-dir", str(out), "--set", "training.merge_method=consensus_ta"])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert set(results["scores"]) == {"base", "merged"}
    assert set(results["scores"]["merged"]) == {"chain_sum", "gcd"}
    assert (out / "merged" / "adapter_model.safetensors").is_file()
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    # the merged adapter's card: the recipe verbatim with the override, the rounds, the scores
    card = (out / "merged" / "README.md").read_text()
    assert (
        path.read_text().strip().splitlines()[0] in card
        and "# --set training.merge_method=consensus_ta" in card
    )
    assert "| round | alpha chain_sum | alpha gcd |" in card and "| 2 |" in card
    assert "| task | base score | base exact | merged score | merged exact |" in card
    # `push` of a training output stages its merged/ folder
    stage = tmp_path / "stage"
    assert main(["push", str(out), "me/run", "--dry-run", "--stage-dir", str(stage)]) == 0
    assert (stage / "adapter_model.safetensors").is_file() and (stage / "README.md").is_file()
    # the staged card's model-index: one result per task, Avg and Worst, equal to results.json
    exact = {t: s["exact_match"] for t, s in results["scores"]["merged"].items()}
    expected = {**exact, "Avg": sum(exact.values()) / 2, "Worst": min(exact.values())}
    found = ModelCard.load(stage / "README.md").data.eval_results
    assert {r.metric_name.removesuffix(" exact_match"): r.metric_value for r in found} == pytest.approx(
        expected
    )
    assert len(found) == 4 and {r.metric_type for r in found} == {"exact_match"}


@pytest.mark.bad_input
def test_train_recipe_errors_name_the_key(tmp_path, tiny_tokenizer, capsys):
    path = _recipe(tmp_path, tiny_tokenizer, num_rounds=0)
    assert main(["train", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "num_rounds must be" in capsys.readouterr().err
    path = _recipe(tmp_path, tiny_tokenizer, learning_rat=1.0)
    assert main(["train", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "training.learning_rat: unknown MetisConfig field" in capsys.readouterr().err


def _offline_recipes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes" / "offline"
    return sorted(root.glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", _offline_recipes(), ids=lambda p: p.name)
def test_every_offline_recipe_runs_a_few_steps(path, tmp_path):
    """Each offline recipe, as written, on the real default model, shrunk to one short round."""
    from metis_hf.recipe import load_recipe

    recipe = load_recipe(path)
    tasks = len(recipe.tasks)
    # The smallest step the schedule allows: one row per task (the parallel schedule routes rows to
    # every task's adapter in each micro-batch), one micro-batch.
    rows = tasks if recipe.training.get("task_schedule") == "parallel" else 1
    sizes = [
        f"tasks.{i}.{split}_size={n}"
        for i in range(tasks)
        for split, n in (("train", 16), ("validation", 4), ("test", 2))
    ]
    overrides = [
        "training.num_rounds=1",
        "training.local_steps=1",
        "training.local_epochs=1.0",
        "training.use_cpu=true",
        f"training.per_device_train_batch_size={rows}",
        "training.gradient_accumulation_steps=1",
        *sizes,
    ]
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                str(path),
                "--output-dir",
                str(out),
                "--no-eval",
                *[a for o in overrides for a in ("--set", o)],
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 1 and (out / "merged" / "adapter_model.safetensors").is_file()


def test_train_resumes_from_the_command_line_to_the_same_merge(tmp_path, tiny_tokenizer, capsys):
    import shutil

    from safetensors.torch import load_file

    path = _recipe(tmp_path, tiny_tokenizer, save_strategy="steps", save_steps=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", str(path), "--output-dir", str(full), "--no-eval"]) == 0
    expected = load_file(str(full / "merged" / "adapter_model.safetensors"))
    steps = sorted(int(p.name.split("-")[1]) for p in full.glob("checkpoint-*"))
    # a run killed after its first round's checkpoint: what it left behind
    cut.mkdir()
    first = f"checkpoint-{steps[0]}"
    shutil.copytree(full / first, cut / first)
    (cut / "rounds.jsonl").write_text((full / "rounds.jsonl").read_text().splitlines()[0] + "\n")

    assert main(["train", str(path), "--output-dir", str(cut), "--no-eval"]) == 2
    assert "or --resume to continue from its latest checkpoint" in capsys.readouterr().err
    assert main(["train", str(path), "--output-dir", str(cut), "--no-eval", "--resume"]) == 0
    resumed = load_file(str(cut / "merged" / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key])
    rounds = [json.loads(line)["round"] for line in (cut / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]  # round 1 is not logged twice


@pytest.mark.bad_input
def test_a_resume_that_cannot_continue_the_run_is_refused(tmp_path, tiny_tokenizer, capsys):
    path = _recipe(tmp_path, tiny_tokenizer, save_strategy="steps", save_steps=4)
    out = tmp_path / "out"
    assert main(["train", str(path), "--output-dir", str(tmp_path / "empty"), "--no-eval", "--resume"]) == 2
    assert "no checkpoint-N folder in" in capsys.readouterr().err
    assert main(["train", str(path), "--output-dir", str(out), "--no-eval"]) == 0
    checkpoint = sorted(out.glob("checkpoint-*"))[0]
    # the recipe's resume_from_checkpoint is honoured, and checked like --resume
    state_file = checkpoint / "metis_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as a 2-process run saves it
    override = f"training.resume_from_checkpoint={checkpoint}"
    assert (
        main(["train", str(path), "--output-dir", str(out), "--no-eval", "--overwrite", "--set", override])
        == 2
    )
    assert "was saved by a run with world_size 2; this run has 1" in capsys.readouterr().err
    state_file.write_text(json.dumps({**state, "round_ends": [3, 6]}))
    assert main(["train", str(path), "--output-dir", str(out), "--no-eval", "--resume", str(checkpoint)]) == 2
    assert "was saved by a run with round_ends [3, 6]" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                str(path),
                "--output-dir",
                str(out),
                "--resume",
                str(checkpoint),
                "--set",
                override.replace("checkpoint-", "x"),
            ]
        )
        == 2
    )
    assert "disagree; give one" in capsys.readouterr().err
