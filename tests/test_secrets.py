"""No token, from any source, in any written or staged file or log line; pushes upload an
allow-list, never pickles or checkpoints unless asked, and no local absolute paths (issue 18.4)."""

from __future__ import annotations

import logging

import pytest
import yaml
from peft import LoraConfig

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.commands import main
from tests.conftest import make_tiny_model, write_tiny_recipe
from tests.test_hub import RecordingApi
from tests.test_trainer import LORA, TRAIN, VAL

TOKENS = {
    "argument": "hf_ARGUMENTtoken1111111111",
    "config": "hf_CONFIGtoken22222222222",
    "recipe": "hf_RECIPEtoken3333333333",
    "override": "hf_OVERRIDEtoken44444444",
    "environment": "hf_ENVIRONMENTtoken555555",
    "stored login": "hf_STOREDtoken66666666666",
}


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """The environment's and the stored login's tokens, as huggingface_hub would find them."""
    monkeypatch.setenv("HF_TOKEN", TOKENS["environment"])
    token_file = tmp_path / "stored_token"
    token_file.write_text(TOKENS["stored login"])
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
    RecordingApi.calls = []
    monkeypatch.setattr("metis_hf.hub.HfApi", RecordingApi)
    return TOKENS


def _leaks(folders, texts=(), uploaded=None):
    """(where, token source) for every token found in any file under ``folders``, in ``texts`` or
    in the files an upload held."""
    contents = {str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}
    contents.update({f"text {i}": text.encode() for i, text in enumerate(texts)})
    contents.update({f"uploaded {name}": data for name, data in (uploaded or {}).items()})
    return [
        (where, source)
        for where, data in contents.items()
        for source, t in TOKENS.items()
        if t.encode() in data
    ]


def test_train_merge_and_push_never_write_a_token(tmp_path, tiny_tokenizer, planted, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    recipe = write_tiny_recipe(
        tmp_path,
        tiny_tokenizer,
        training={"hub_token": TOKENS["recipe"], "save_strategy": "steps", "save_steps": 2},
    )
    out, stage = tmp_path / "out", tmp_path / "stage"
    override = f"training.hub_token={TOKENS['override']}"
    assert main(["train", str(recipe), "--output-dir", str(out), "--no-eval", "--set", override]) == 0
    assert list(out.rglob("training_args.bin"))  # checkpoints were written: the pickle is checked too
    assert "# --set training.hub_token=<redacted>" in (out / "merged" / "README.md").read_text()
    assert yaml.safe_load(recipe.read_text())["training"]["hub_token"] == TOKENS["recipe"]  # input untouched
    assert main(["push", str(out), "me/x", "--dry-run", "--stage-dir", str(stage)]) == 0
    assert main(["push", str(out / "merged"), "me/x"]) == 0
    uploaded = next(kw for name, kw in RecordingApi.calls if name == "upload_folder")["files"]
    captured = capsys.readouterr()
    assert _leaks([out, stage], [captured.out, captured.err, caplog.text], uploaded) == []
    # no local path leaves the machine: the tiny base model is a local folder
    for name in ("README.md", "metis_card.json", "adapter_config.json"):
        assert (
            str(tmp_path) not in (stage / name).read_text() and str(tmp_path).encode() not in uploaded[name]
        )
    assert "is a local folder; it is uploaded as null" in caplog.text


def test_python_api_checkpoints_and_push_never_hold_the_token(tmp_path, tiny_tokenizer, planted, caplog):
    caplog.set_level(logging.DEBUG)
    model = make_tiny_model(len(tiny_tokenizer))
    model.config._name_or_path = "org/tiny"
    args = MetisConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, num_rounds=2, local_steps=1, max_length=64,
        hub_token=TOKENS["config"], hub_model_id="me/tiny", save_strategy="steps", save_steps=2,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = MetisTrainer(
        model, args, TRAIN, VAL, processing_class=tiny_tokenizer, peft_config=LoraConfig(**LORA)
    )
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub(token=TOKENS["argument"])
    assert trainer.args.hub_token == TOKENS["config"]  # kept in memory for the Trainer's own pushes
    uploaded = next(kw for name, kw in RecordingApi.calls if name == "upload_folder")["files"]
    assert _leaks([tmp_path / "run"], [caplog.text], uploaded) == []
    # `metis-hf push` of this Python-API output_dir: an allow-list, no checkpoint-N/, no pickle
    stage = tmp_path / "stage"
    assert main(["push", str(tmp_path / "run"), "me/tiny", "--dry-run", "--stage-dir", str(stage)]) == 0
    staged = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(staged)
    assert not [f for f in staged if f.startswith("checkpoint-") or f.endswith((".bin", ".pt", ".pth"))], (
        staged
    )
    with_checkpoints = tmp_path / "stage2"
    assert main(["push", str(tmp_path / "run"), "me/tiny", "--dry-run", "--include-checkpoints",
                 "--stage-dir", str(with_checkpoints)]) == 0  # fmt: skip
    staged = sorted(str(p.relative_to(with_checkpoints)) for p in with_checkpoints.rglob("*") if p.is_file())
    assert any(f.startswith("checkpoint-2/") and f.endswith(".safetensors") for f in staged)
    assert not [f for f in staged if f.endswith((".bin", ".pt", ".pth"))], staged


UNREGISTERED = "hf_" + "Qz7" * 12  # in a token's format, but known to nothing: caught by its form


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "text, secret",
    [
        (f"# my token is {UNREGISTERED}\nmodel: x\n", UNREGISTERED),
        (f"notes: 'pushed with {UNREGISTERED} yesterday'\n", UNREGISTERED),
        ("use_auth_token: sekrit-value-1\n", "sekrit-value-1"),
        ("push_to_hub_token: 'sekrit-value-2'\n", "sekrit-value-2"),
        ("hubToken: sekrit-value-3\n", "sekrit-value-3"),
        ("hub-token: sekrit-value-4\n", "sekrit-value-4"),
        ("wandb_api_key: 0123456789abcdef0123\n", "0123456789abcdef0123"),
        ("headers: {Authorization: Bearer sekrit-value-6}\n", "sekrit-value-6"),
        ("training:\n  hub_token: >-\n    sekrit-value-7\n  seed: 0\n", "sekrit-value-7"),
        ("training:\n  hub_token: |\n    sekrit-value-8\n    more-of-it-9\nmodel: x\n", "more-of-it-9"),
    ],
)
def test_redaction_catches_token_formats_and_every_secret_key_form(text, secret):
    from metis_hf.redact import REDACTED, redact_text

    clean = redact_text(text)
    assert secret not in clean and REDACTED in clean
    data = yaml.safe_load(clean)  # still the same YAML, less the secret
    assert yaml.safe_load(text).keys() == data.keys()


def test_redaction_leaves_ordinary_keys_alone():
    from metis_hf.redact import redact_text

    text = "training:\n  max_new_tokens: 8\n  pad_token: <pad>\n  seed: 0\n  hub_model_id: me/merged\n"
    assert redact_text(text) == text


@pytest.mark.bad_input
def test_local_paths_after_a_colon_are_hidden_but_urls_kept():
    from metis_hf.redact import LOCAL_PATH, hide_local_paths

    text = "base_model:adapter:/tmp/run/checkpoint-75 from https://huggingface.co/org/model"
    assert hide_local_paths(text) == f"base_model:adapter:{LOCAL_PATH} from https://huggingface.co/org/model"
