"""MetisConfig in TRL's own tooling: HfArgumentParser / TrlParser, the example script shaped like
trl/scripts/sft.py, and TRL's model-card code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig
from transformers import HfArgumentParser
from trl import ModelConfig, TrlParser

from metis_hf import MetisConfig, MetisTrainer
from tests.conftest import make_tiny_model
from tests.test_trainer import LORA, TRAIN, VAL

ROOT = Path(__file__).resolve().parents[1]


def test_hf_argument_parser_reads_per_round_lists_and_json_merge_params(tmp_path):
    (config,) = HfArgumentParser(MetisConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--num_rounds", "3", "--temperature", "4", "3", "2"]
        + ["--beta", "1.2", "--merge_params", '{"delta": [0.1, 0.2, 0.3]}']
    )
    assert config.temperature == [4.0, 3.0, 2.0] and config.beta == [1.2]
    assert config.merge_params == {"delta": [0.1, 0.2, 0.3], "temperature": [4.0, 3.0, 2.0], "beta": 1.2}
    (config,) = HfArgumentParser(MetisConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--merge_method", "ties", "--merge_params", '{"density": 0.3}']
    )
    assert config.merge_params == {"density": 0.3} and config.temperature is None
    assert MetisConfig(output_dir=str(tmp_path), use_cpu=True, temperature=2.5).merge_params == {
        "temperature": 2.5
    }
    with pytest.raises(ValueError, match="merge_params: '\\{density' is not a JSON object"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_params="{density")


def test_trl_parser_takes_a_config_file_and_flags_override_it(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "o"),
                "use_cpu": True,
                "num_rounds": 2,
                "merge_method": "ties",
                "merge_params": {"density": 0.5},
                "learning_rate": 3e-4,
            }
        )
    )
    config, model = TrlParser((MetisConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(path), "--learning_rate", "1e-4", "--model_name_or_path", "org/model"]
    )
    assert config.learning_rate == 1e-4 and config.num_rounds == 2
    assert config.merge_method == "ties" and config.merge_params == {"density": 0.5}
    assert model.model_name_or_path == "org/model"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_example_script_trains_a_few_steps_on_local_files(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    files = {name: _jsonl(tmp_path / f"{name}.jsonl", list(data) * 2) for name, data in TRAIN.items()}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"num_rounds": 2, "local_steps": 1, "merge_method": "metis", "max_length": 64})
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, str(ROOT / "examples" / "train_metis.py"),
        "--config", str(config),
        "--model_name_or_path", str(model_dir),
        "--task_datasets", *[f"{name}={path}" for name, path in files.items()],
        "--validation_size", "4",
        "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and set(TRAIN) == {
        key.removeprefix("merge/loss_gap/") for key in rounds[0] if key.startswith("merge/loss_gap/")
    }


def test_trls_model_card_code_tags_and_cites_metis(tmp_path, tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer))
    model.config._name_or_path = "org/tiny"
    trainer = MetisTrainer(
        model, MetisConfig(output_dir=str(tmp_path), use_cpu=True, local_steps=1), TRAIN, VAL,
        processing_class=tiny_tokenizer, peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    trainer.create_model_card(model_name="tiny-metis")
    card = (tmp_path / "README.md").read_text()
    assert "metis" in card.split("---")[1] and "model-merging" in card.split("---")[1]
    assert "2606.16501" in card and "@inproceedings{im2026metis" in card and "METIS" in card


def test_round_metrics_reach_a_real_tracker(tmp_path, tiny_tokenizer, monkeypatch):
    """report_to="tensorboard" (an offline tracker): every round's merge metrics are in the event
    files, read back with TensorBoard's own reader, equal to the trainer's round records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = MetisConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, num_rounds=2, local_steps=2, max_length=64,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, report_to="tensorboard",
        logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = MetisTrainer(
        make_tiny_model(len(tiny_tokenizer)), args, TRAIN, VAL, processing_class=tiny_tokenizer,
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    trainer.train()
    trainer.end()  # flushes the trackers
    (events,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for name in ("merge/mask_density", "merge/multitask_loss", "merge/alpha/add1", "merge/loss_gap/add3"):
        logged = [event.value for event in accumulator.Scalars(f"train/{name}")]
        expected = [record[name] for record in trainer.round_records]
        assert logged == pytest.approx(expected, rel=1e-6), (name, tags)
    assert len(accumulator.Scalars("train/round")) == 2
