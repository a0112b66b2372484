"""A merge method registered here, in this file only, runs many-shot and post hoc through
MetisTrainer and through `metis-hf merge`, with its card text: no other file is edited (issue 19)."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import LoraConfig

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.commands import main
from metis_hf.merging import register_merge_method
from metis_hf.merging.task_vectors import lora_state
from tests.conftest import make_tiny_model
from tests.test_trainer import LORA, TRAIN, VAL


@register_merge_method(
    "test_median",
    pretty_name="Coordinate median",
    description="The coordinate-wise median of the task vectors, times scale.",
    overwrite=True,
)
def median(task_vectors, *, scale: float = 1.0):
    """Coordinate-wise median (the lower of the two middle values for an even count), times scale."""
    return scale * torch.stack([v.float() for v in task_vectors]).median(0).values.to(task_vectors[0].dtype)


def _largest_gap(params, count):
    gaps = params["loss_gaps"]
    return [1.0 if g == max(gaps) else 0.0 for g in gaps]


@register_merge_method("test_largest_gap", task_weights=_largest_gap, overwrite=True)
def largest_gap(task_vectors, *, loss_gaps=None):
    """The task vector of the task with the largest loss gap (the one the merge erased most)."""
    return task_vectors[_largest_gap({"loss_gaps": loss_gaps}, len(task_vectors)).index(1.0)].clone()


def _train(tmp_path, tokenizer, **fields):
    settings = dict(num_rounds=2, local_steps=2, max_length=64, per_device_train_batch_size=2)
    args = MetisConfig(
        output_dir=str(tmp_path), use_cpu=True, gradient_accumulation_steps=1, disable_tqdm=True,
        **{**settings, **fields},
    )  # fmt: skip
    trainer = MetisTrainer(
        make_tiny_model(len(tokenizer)),
        args,
        TRAIN,
        VAL,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("protocol", ["many_shot", "post_hoc"])
def test_a_method_registered_here_trains_and_merges(tmp_path, tiny_tokenizer, protocol):
    trainer = _train(
        tmp_path, tiny_tokenizer, merge_method="test_median", merge_params={"scale": 0.5}, protocol=protocol
    )
    tasks = [lora_state(trainer.peft_model, t) for t in TRAIN]  # each task's last local result
    merged = lora_state(trainer.peft_model, "default")
    for key in merged:
        expected = 0.5 * torch.stack([t[key] for t in tasks]).median(0).values
        torch.testing.assert_close(merged[key], expected, atol=0, rtol=0)
    assert len(trainer.round_records) == (2 if protocol == "many_shot" else 1)
    assert trainer.round_records[-1]["merge/alpha/add1"] == 0.5  # scale x weight 1 (no task_weights rule)


def test_a_loss_gap_method_gets_gaps_from_training_and_logs_its_weights(tmp_path, tiny_tokenizer):
    trainer = _train(tmp_path, tiny_tokenizer, merge_method="test_largest_gap")
    last = trainer.round_records[-1]
    gaps = {t: last[f"merge/loss_gap/{t}"] for t in TRAIN}
    winner = max(gaps, key=gaps.get)
    assert [last[f"merge/alpha/{t}"] for t in TRAIN] == [1.0 if t == winner else 0.0 for t in TRAIN]
    merged, chosen = lora_state(trainer.peft_model, "default"), lora_state(trainer.peft_model, winner)
    assert all(torch.equal(merged[k], chosen[k]) for k in merged)
    with pytest.raises(ValueError, match="test_largest_gap needs eval_dataset"):
        MetisTrainer(make_tiny_model(8), MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="test_largest_gap"), TRAIN)  # fmt: skip


def test_a_method_registered_here_merges_files_with_its_card(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    folders = []
    for seed in range(3):
        trainer = _train(
            tmp_path / f"run{seed}", tiny_tokenizer, merge_method="test_median", seed=seed, num_rounds=1
        )
        trainer.save_model(str(tmp_path / f"adapter{seed}"))
        folders.append(tmp_path / f"adapter{seed}")
    config = tmp_path / "m.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "test_median",
                "models": [{"model": str(f)} for f in folders],
                "parameters": {"scale": 2.0},
            }
        )
    )
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    states = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    merged = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for key in merged:
        torch.testing.assert_close(merged[key], 2.0 * torch.stack([s[key] for s in states]).median(0).values)
    assert (
        "The coordinate-wise median of the task vectors, times scale."
        in (tmp_path / "out" / "README.md").read_text()
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "merge_method": "test_median",
                "models": [{"model": str(f), "parameters": {"weight": 1}} for f in folders],
            }
        )
    )
    assert main(["merge", str(bad), str(tmp_path / "out2")]) == 2  # it takes no per-model weight


def test_a_method_registered_here_runs_in_mergekits_yaml_runner(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.test_merge_files import _checkpoints

    base, tuned = _checkpoints(tmp_path)
    config = tmp_path / "mk.yaml"
    models = [{"model": str(tmp_path / f"ft{i}")} for i in range(2)] + [{"model": str(tmp_path / "base")}]
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "test_median",
                "base_model": str(tmp_path / "base"),
                "models": models,
                "parameters": {"scale": 3.0},
                "dtype": "float32",
            }
        )
    )
    assert main(["mergekit-yaml", str(config), str(tmp_path / "mk")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "mk").state_dict()
    before = base.state_dict()
    for key in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        deltas = torch.stack([m.state_dict()[key] - before[key] for m in tuned])
        # mergekit drops the base from its inputs, so the median is over the two tuned models.
        expected = before[key] + 3.0 * deltas.median(0).values
        torch.testing.assert_close(merged[key], expected)
    config.write_text(config.read_text().replace("scale: 3.0", "scael: 3.0"))
    assert main(["mergekit-yaml", str(config), str(tmp_path / "mk2")]) == 2  # misspelt: named, not dropped
