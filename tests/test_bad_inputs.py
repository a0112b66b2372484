"""Bad inputs a new user tries, walked item by item (issue 17): each stops with a clear error that
names the culprit, or is handled correctly; nothing the user had is lost or silently corrupted.

``pytest -m bad_input -q`` runs these and the bad-input tests of the other files; its count is
the number of bad inputs tried."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.tokenization import tokenize_example
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.bad_input

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _tasks(n_long=12, n_short=10):
    """Task 'long' first: every other prompt alone is longer than max_length=24, so dropping those
    examples would shift the row range of 'short' if the trainer did not own the filtering."""
    long_rows = [
        {
            "prompt": ("Spell this word backward: cat " * (8 if i % 2 else 1)) + f"{i}\nAnswer:",
            "completion": " tac",
        }
        for i in range(n_long)
    ]
    short_rows = [{"prompt": f"What is {i} + 1?\nAnswer:", "completion": f" {i + 1}"} for i in range(n_short)]
    return {"long": Dataset.from_list(long_rows), "short": Dataset.from_list(short_rows)}


class _RecordingTrainer(MetisTrainer):
    """Records, for every micro-batch, the task the plan trains and the rows it holds."""

    seen: list[tuple[str, list[tuple[int, ...]]]]

    def training_step(self, model, inputs, num_items_in_batch=None):
        task = self.task_names[self.plan.step(self.state.global_step).task]
        rows = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])
        ]
        self.seen.append((task, rows))
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("completion_only", [True, False])
def test_every_step_trains_on_its_own_tasks_rows_under_truncation(
    tmp_path, tiny_tokenizer, caplog, completion_only
):
    data = _tasks()
    max_length = 24
    expected = {}
    for task, dataset in data.items():
        encoded = [
            tokenize_example(tiny_tokenizer, r["prompt"], r["completion"], max_length) for r in dataset
        ]
        kept = [e for e in encoded if any(e["completion_mask"])] if completion_only else encoded
        expected[task] = {tuple(e["input_ids"]) for e in kept}
    dropped = len(data["long"]) - sum(
        1
        for r in data["long"]
        if any(tokenize_example(tiny_tokenizer, r["prompt"], r["completion"], max_length)["completion_mask"])
    )
    assert completion_only is False or dropped == 6  # the fixture really truncates prompts away
    args = MetisConfig(
        output_dir=str(tmp_path / "run"),
        num_rounds=2,
        local_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_length=max_length,
        completion_only_loss=completion_only,
        merge_method="task_arithmetic",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
    )
    with caplog.at_level(logging.WARNING, logger="metis_hf"):
        trainer = _RecordingTrainer(
            model=make_tiny_model(len(tiny_tokenizer)),
            args=args,
            train_dataset=data,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(**LORA),
        )
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 2 * 2 * 4 * 2  # rounds x tasks x steps x micro-batches
    for task, rows in trainer.seen:
        assert all(row in expected[task] for row in rows), f"a {task} step holds another task's rows"
    warned = [r.getMessage() for r in caplog.records if "are dropped" in r.getMessage()]
    if completion_only:
        assert warned == [
            f"task 'long' train: {dropped} of 12 examples have no completion token within "
            f"max_length={max_length} (the prompt fills it) and are dropped."
        ]
    else:
        assert warned == []


def test_a_task_with_no_trainable_example_is_named(tmp_path, tiny_tokenizer):
    data = _tasks()
    data["long"] = data["long"].select([1, 3])  # only the over-long prompts
    args = MetisConfig(
        output_dir=str(tmp_path / "run"),
        max_length=24,
        completion_only_loss=True,
        merge_method="ties",
        use_cpu=True,
        local_steps=1,
        num_rounds=1,
    )
    with pytest.raises(ValueError, match="task 'long' train: no example has a completion token left"):
        MetisTrainer(
            make_tiny_model(len(tiny_tokenizer)),
            args,
            data,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(**LORA),
        )


@pytest.mark.parametrize("field", ["packing", "shuffle_dataset"])
def test_packing_and_shuffling_are_refused(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field} is not supported"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, **{field: True})


# --- 2. non-LoRA tensors are never merged as LoRA factors ---------------------------------------


def _write_yaml(path, config):
    import yaml

    path.write_text(yaml.safe_dump(config))
    return str(path)


def _saved_adapters(tmp_path, **lora_options):
    from peft import get_peft_model

    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = get_peft_model(make_tiny_model(64), LoraConfig(**LORA, **lora_options))
        folder = tmp_path / f"adapter{seed}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.mark.parametrize(
    "options,culprit",
    [(dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(use_dora=True), "use_dora")],
)
def test_merge_refuses_adapters_with_non_lora_tensors(tmp_path, capsys, options, culprit):
    from metis_hf.commands import main

    folders = _saved_adapters(tmp_path, **options)
    config = _write_yaml(
        tmp_path / "m.yaml",
        {"merge_method": "ties", "models": [{"model": f} for f in folders], "parameters": {"density": 0.2}},
    )
    assert main(["merge", config, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert culprit in err and "adapter0" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [dict(modules_to_save=["lm_head"]), dict(use_dora=True)])
def test_non_lora_tensors_are_refused_even_when_the_config_hides_them(tmp_path, options):
    """An adapter_config.json edited by hand: the tensors themselves are checked too."""
    import json

    from metis_hf.workflows.merge import MergeConfig, ModelEntry, run_merge

    folders = _saved_adapters(tmp_path, **options)
    for folder in folders:
        path = tmp_path / folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(use_dora=False, modules_to_save=None)
        path.write_text(json.dumps(config))
    config = MergeConfig("ties", [ModelEntry(f) for f in folders], parameters={"density": 0.2})
    with pytest.raises(ValueError, match="is (a DoRA magnitude|not a LoRA factor)"):
        run_merge(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize("option", [dict(use_dora=True), dict(modules_to_save=["lm_head"])])
def test_trainer_refuses_lora_options_it_cannot_merge(tmp_path, tiny_tokenizer, option):
    args = MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="ties", local_steps=1)
    with pytest.raises(ValueError, match=f"peft_config.{next(iter(option))} is not supported"):
        MetisTrainer(
            make_tiny_model(len(tiny_tokenizer)),
            args,
            _tasks(),
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(**LORA, **option),
        )


# --- 3. merge --overwrite never deletes its inputs ---------------------------------------------


@pytest.mark.parametrize("out", ["adapters", "adapters/adapter0", ".", "file.txt", "m.yaml"])
def test_merge_overwrite_refuses_outputs_that_would_delete_inputs(tmp_path, monkeypatch, capsys, out):
    from metis_hf.commands import main

    folders = _saved_adapters(tmp_path / "adapters")
    config = _write_yaml(
        tmp_path / "m.yaml", {"merge_method": "task_arithmetic", "models": [{"model": f} for f in folders]}
    )
    (tmp_path / "file.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["merge", config, out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert ("is a file" in err) if out in ("file.txt", "m.yaml") else ("would" in err and "delete" in err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- 4. merge parameters are checked when the config or trainer is built -----------------------


@pytest.mark.parametrize(
    "field,message",
    [
        (dict(k=0), r"k must be an integer in \[1, 2\]"),
        (
            dict(merge_params={"k": 3, "weights": [1, 1]}, merge_method="consensus_ta"),
            r"k must be an integer in \[1, 2\]",
        ),
        (dict(delta=-1.0), "delta must be a finite number >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=[2.0, -1.0], num_rounds=2), "temperature must be a finite number > 0"),
        (dict(beta=float("nan")), "beta must be finite"),
    ],
)
def test_metis_config_checks_its_merge_fields(tmp_path, field, message):
    with pytest.raises(ValueError, match=message):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, **field)


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("metis", {"temperature": 0}, "temperature must be a finite number > 0"),
        ("metis", {"k": 0}, r"k must be an integer in \[1, 2\]"),
        ("metis", {"k": 3}, r"k must be an integer in \[1, 2\]"),
        ("metis", {"delta": -1}, "delta must be a finite number >= 0"),
        ("consensus_ta", {"k": 5}, r"k must be an integer in \[1, 2\]"),
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("dare_ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("metis_robust", {"gap_normalization": "zscore"}, "gap_normalization must be one of"),
        ("task_arithmetic", {"weights": [1.0, 2.0, 3.0]}, "weights has 3 entries for 2 task vectors"),
    ],
)
def test_merge_params_fail_before_training(tmp_path, tiny_tokenizer, method, params, message):
    """When the config is built where the parameters alone are wrong, else when the trainer is
    (the task count is known there)."""
    data = _tasks()
    with pytest.raises(ValueError, match=message):
        args = MetisConfig(
            output_dir=str(tmp_path), use_cpu=True, merge_method=method, merge_params=params, local_steps=1
        )
        MetisTrainer(
            "unused-because-the-check-comes-first",
            args,
            data,
            eval_dataset=data,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(**LORA),
        )


# --- 5. recipe sections are type-checked; YAML 1.1's 1e-4 is a number --------------------------


def test_yaml_numbers_without_a_dot_are_floats_and_sections_are_type_checked(tmp_path, tiny_tokenizer):
    from metis_hf.recipe import RecipeError, load_recipe, lora_config_from_recipe, metis_config_from_recipe
    from tests.conftest import write_tiny_recipe

    path = write_tiny_recipe(tmp_path, tiny_tokenizer)
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "lora.lora_dropout=5e-2"])
    assert metis_config_from_recipe(recipe, tmp_path / "o").learning_rate == 1e-4
    assert lora_config_from_recipe(recipe).lora_dropout == 0.05
    for override, message in [
        (
            "training.learning_rate=fast",
            r"training.learning_rate: Input should be a valid number \(got 'fast'\)",
        ),
        ("training.num_rounds=two", r"training.num_rounds: Input should be a valid integer \(got 'two'\)"),
        (
            "training.local_steps=[1, 2]",
            r"training.local_steps: Input should be a valid integer \(got \[1, 2\]\)",
        ),
        ("lora.r=sixteen", r"lora.r: Input should be a valid integer \(got 'sixteen'\)"),
        ("training.num_rounds=1e-4", r"training.num_rounds: Input should be a valid integer \(got '1e-4'\)"),
        ("training.num_rounds=true", r"training.num_rounds: Input should be a valid integer \(got True\)"),
        (
            "training.temperature=[1, x]",
            r"training.temperature\[1\]: Input should be a valid number \(got 'x'\)",
        ),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe = load_recipe(path, [override])
            metis_config_from_recipe(recipe, tmp_path / "o")
            lora_config_from_recipe(recipe)


# --- 6. --set paths and values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("tasks.5.name=x", "--set tasks.5.name: tasks has 2 entries, so index 5 does not exist"),
        ("seed.x=1", r"--set seed.x: seed is a int \(1\), not a mapping or list"),
        ("tasks.0.name.x=1", r"--set tasks.0.name.x: tasks.0.name is a str \('chain_sum'\), not a mapping"),
        ("tasks.x.name=foo", "--set tasks.x.name: tasks is a list; 'x' is not an index"),
        ("tasks=[1", r"--set tasks: the value '\[1' is not valid YAML"),
        ("training..lr=1", "expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
    ],
)
def test_set_overrides_name_the_path(tmp_path, tiny_tokenizer, capsys, override, message):
    from metis_hf.commands import main
    from tests.conftest import write_tiny_recipe

    path = write_tiny_recipe(tmp_path, tiny_tokenizer)
    capsys.readouterr()
    assert main(["train", str(path), "--output-dir", str(tmp_path / "o"), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()


def test_set_overrides_still_create_and_replace_keys():
    from metis_hf.recipe import apply_overrides

    data = {"tasks": [{"name": "a"}], "training": {}}
    out = apply_overrides(
        data, ["tasks.0.name=b", "training.lr=1e-4", "compare.seeds=[0, 1]", "new.deep.key=x"]
    )
    assert out == {
        "tasks": [{"name": "b"}],
        "training": {"lr": "1e-4"},
        "compare": {"seeds": [0, 1]},
        "new": {"deep": {"key": "x"}},
    }
    assert data == {"tasks": [{"name": "a"}], "training": {}}


# --- 7. training over an earlier run -----------------------------------------------------------


def test_train_refuses_an_earlier_run_without_overwrite_and_replaces_it_with(
    tmp_path, tiny_tokenizer, capsys
):
    from safetensors.torch import load_file

    from metis_hf.commands import main
    from tests.conftest import write_tiny_recipe

    path = write_tiny_recipe(tmp_path, tiny_tokenizer)
    out = tmp_path / "out"
    command = ["train", str(path), "--output-dir", str(out), "--no-eval"]
    assert main([*command, "--set", "training.merge_method=task_arithmetic"]) == 0
    first = load_file(str(out / "merged" / "adapter_model.safetensors"))
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main([*command, "--set", "training.num_rounds=1"]) == 2
    assert (
        "holds an earlier run (merged, results.json, rounds.jsonl); pass --overwrite"
        in capsys.readouterr().err
    )
    assert all(
        torch.equal(first[k], v)
        for k, v in load_file(str(out / "merged" / "adapter_model.safetensors")).items()
    )
    assert main([*command, "--overwrite", "--set", "training.num_rounds=1"]) == 0
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 1  # replaced, not appended
    second = load_file(str(out / "merged" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], v) for k, v in second.items())
    assert sorted(p.name for p in out.iterdir()) == ["merged", "results.json", "rounds.jsonl"]


# --- 8. errors name the file; nothing half-written stays behind --------------------------------


def _merge_yaml(tmp_path, folders, method="task_arithmetic"):
    return _write_yaml(
        tmp_path / "m.yaml", {"merge_method": method, "models": [{"model": f} for f in folders]}
    )


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "adapter_model.safetensors: "),
        (lambda p: p.write_bytes(b"garbage"), "adapter_model.safetensors: not a readable safetensors file"),
        (
            lambda p: (p.parent / "adapter_config.json").write_text("{r: 4,"),
            "adapter_config.json: not valid JSON",
        ),
    ],
    ids=["truncated", "garbage", "bad-config"],
)
def test_broken_files_are_named(tmp_path, capsys, damage, message):
    from metis_hf.commands import main

    folders = _saved_adapters(tmp_path)
    damage(tmp_path / "adapter1" / "adapter_model.safetensors")
    assert main(["merge", _merge_yaml(tmp_path, folders), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "adapter1") in err and message in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_stale_temporary_outputs_of_killed_merges_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from metis_hf.commands import main
    from metis_hf.workflows.merge import OWNER_FILE

    folders = _saved_adapters(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale, running = tmp_path / ".out-killed", tmp_path / ".out-running"
    for folder, pid in ((stale, dead.stdout.strip()), (running, str(os.getpid()))):
        folder.mkdir()
        (folder / OWNER_FILE).write_text(pid)
        (folder / "model-part00000.safetensors").write_bytes(b"partial")
    assert main(["merge", _merge_yaml(tmp_path, folders), str(tmp_path / "out")]) == 0
    assert not stale.exists() and running.exists()
    assert not (tmp_path / "out" / OWNER_FILE).exists()


def test_a_failed_dry_run_push_leaves_no_stage_folder(tmp_path, monkeypatch, capsys):
    import tempfile

    from metis_hf.commands import main

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []
    assert main(["push", str(folder), "me/x", "--dry-run", "--stage-dir", str(tmp_path / "stage")]) == 2
    assert not (tmp_path / "stage").exists()


# --- 9. options are never silently ignored -----------------------------------------------------


def test_granularity_is_checked_and_refused_for_checkpoints(tmp_path, capsys):
    from metis_hf.commands import main
    from tests.test_merge_files import _checkpoints

    _checkpoints(tmp_path)
    config = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)],
    }
    for granularity, message in [
        ("foo", "granularity: Input should be 'tensor' or 'global' (got 'foo')"),
        ("global", "granularity: 'global' applies to adapters only"),
    ]:
        path = _write_yaml(tmp_path / "m.yaml", {**config, "granularity": granularity})
        assert main(["merge", path, str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(models_parameters=None), "loss_gap"),
        (dict(parameters={"temprature": 1.0}), r"parameters.temprature: metis has no such parameter"),
        (
            dict(models_parameters={"loss_gap": 0.1, "weigth": 1}),
            r"models\[0\].parameters.weigth: metis has no such",
        ),
        (dict(parameters={"k": 3}), r"k must be an integer in \[1, 2\]"),
        (dict(merge_method="metiss"), "merge_method: unknown method 'metiss'"),
    ],
)
def test_mergekit_yaml_refuses_what_mergekit_would_ignore(tmp_path, capsys, change, message):
    from metis_hf.commands import main
    from tests.test_merge_files import _checkpoints

    _checkpoints(tmp_path)
    per_model = change.get("models_parameters", {"loss_gap": 0.1})
    config = {
        "merge_method": change.get("merge_method", "metis"),
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / f"ft{i}"), **({"parameters": per_model} if per_model else {})}
            for i in range(2)
        ],
        "parameters": change.get("parameters", {}),
        "dtype": "float32",
    }
    capsys.readouterr()
    assert main(["mergekit-yaml", _write_yaml(tmp_path / "mk.yaml", config), str(tmp_path / "mk")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "mk").exists()


def test_adapters_of_different_base_models_are_warned_about(tmp_path, caplog):
    import json

    from metis_hf.workflows.merge import MergeConfig, ModelEntry, run_merge

    folders = _saved_adapters(tmp_path)
    for folder, base in zip(folders, ("org/model-a", "org/model-b")):
        path = tmp_path / folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base}))
    with caplog.at_level(logging.WARNING, logger="metis_hf"):
        run_merge(
            MergeConfig("task_arithmetic", [ModelEntry(f) for f in folders]), tmp_path / "out", progress=False
        )
    assert any(
        "different base models" in r.getMessage() and "org/model-b" in r.getMessage() for r in caplog.records
    )


# --- 10. the Python API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,vectors,params,message",
    [
        ("task_arithmetic", "mixed", {}, "Task vector 1 has dtype torch.bfloat16, task 0 has torch.float32"),
        ("metis", "f32", {"alphas": [0.7, 0.5, -0.2]}, r"alphas must be >= 0 and sum to 1"),
        ("metis", "f32", {"alphas": [0.2, 0.2, 0.2]}, r"alphas must be >= 0 and sum to 1"),
        ("metis_robust", "f32", {"alphas": [0.5, 0.5, 0.5]}, r"alphas must be >= 0 and sum to 1"),
        (
            "metis",
            "f32",
            {"loss_gaps": 0.1},
            r"loss_gaps must be a list of 3 numbers in task order, got float",
        ),
        ("dare_ties", "f32", {"seed": 1.5}, r"seed must be an integer or a list of 3 integers, got 1.5"),
        ("dare_linear", "f32", {"seed": [1, 2]}, "seed has 2 entries for 3 task vectors"),
        (
            "task_arithmetic",
            "f32",
            {"weights": {"a": 1.0}},
            r"weights must be a list of 3 numbers in task order, got dict",
        ),
        ("ties", "f32", {"weights": ["x", 1, 2]}, r"weights must be a list of 3 numbers"),
    ],
)
def test_merge_api_bad_inputs(method, vectors, params, message):
    from metis_hf.merging import merge

    taus = [torch.randn(10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    if vectors == "mixed":
        taus[1] = taus[1].bfloat16()
    with pytest.raises(ValueError, match=message):
        merge(method, taus, **params)


@pytest.mark.parametrize(
    "train,message",
    [
        (
            {"a": [{"prompt": "x", "completion": "y"}]},
            r"train_dataset\['a'\] is a list, not a datasets.Dataset",
        ),
        ({"math/easy": None}, r"Task name 'math/easy' is not usable as an adapter and folder name"),
        ({"..": None}, r"Task name '..' is not usable"),
    ],
)
def test_trainer_api_bad_inputs(tmp_path, tiny_tokenizer, train, message):
    args = MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="ties", local_steps=1)
    with pytest.raises(ValueError, match=message):
        MetisTrainer(make_tiny_model(len(tiny_tokenizer)), args, train, processing_class=tiny_tokenizer)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "evaluation.batch_size=0",
            "evaluation.batch_size: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "evaluation.max_new_tokens=-1",
            "evaluation.max_new_tokens: Input should be greater than or equal to 1 (got -1)",
        ),
        ("model=/nonexistent", "model '/nonexistent': no such folder, and not a Hub id"),
        (
            "evaluation.retention=[{name: dates, bigbench: date_understanding, path: t.json}]",
            "evaluation.retention[0]: give exactly one of bigbench, path or harness (got ['bigbench', 'path'])",
        ),
    ],
)
def test_train_recipe_values_users_get_wrong(tmp_path, tiny_tokenizer, capsys, override, message):
    from metis_hf.commands import main
    from tests.conftest import write_tiny_recipe

    path = write_tiny_recipe(tmp_path, tiny_tokenizer)
    capsys.readouterr()
    assert (
        main(["train", str(path), "--output-dir", str(tmp_path / "o"), "--no-eval", "--set", override]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len(err[-1]) < 300, err
