"""Model cards and pushes: front matter, card body, the HfApi calls, tokens, bad input.

The network boundary (huggingface_hub.HfApi) is replaced by a recorder in these tests only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from peft import LoraConfig
from safetensors.torch import load_file

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.commands import main
from metis_hf.hub import card_info_for, push_folder, render_card, stage_folder
from tests.conftest import make_tiny_model
from tests.test_trainer import TRAIN, VAL

SECRET = "hf_SECRETtoken0123456789abcdef"
TAGS = {"metis", "merge", "many-shot-merging", "trl", "sft", "lora"}


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls and what the uploaded folder held."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token_given": token is not None}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


class NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a network client was created")


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("metis_hf.hub.HfApi", RecordingApi)
    return RecordingApi


def _uploaded(api):
    return next(kw for name, kw in api.calls if name == "upload_folder")


def test_trainer_push_uploads_the_merged_adapter_with_its_card(
    tmp_path, tiny_tokenizer, api, monkeypatch, caplog
):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    model = make_tiny_model(len(tiny_tokenizer))
    model.config._name_or_path = "test-org/tiny-llama"  # as if loaded from the Hub
    args = MetisConfig(
        output_dir=str(tmp_path / "run"),
        num_rounds=2,
        local_steps=1,
        per_device_train_batch_size=2,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        hub_model_id="me/tiny-metis",
        report_to="none",
    )
    trainer = MetisTrainer(
        model=model,
        args=args,
        train_dataset=TRAIN,
        eval_dataset=VAL,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    url = trainer.push_to_hub()
    assert url == "https://huggingface.co/me/tiny-metis"
    assert (
        "create_repo",
        {"repo_id": "me/tiny-metis", "private": False, "exist_ok": True, "repo_type": "model"},
    ) in api.calls
    upload = _uploaded(api)
    assert upload["repo_id"] == "me/tiny-metis" and upload["commit_message"] == "End of training"
    files = upload["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "metis_card.json"} <= set(files)
    config = json.loads(files["adapter_config.json"])
    assert config["base_model_name_or_path"] == "test-org/tiny-llama"
    card_path = tmp_path / "README.md"
    card_path.write_bytes(files["README.md"])
    meta = metadata_load(card_path)
    assert meta["base_model"] == ["test-org/tiny-llama"] and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and TAGS | {"metis"} <= set(meta["tags"])
    card = ModelCard.load(card_path)
    assert card.data.library_name == "peft"
    text = files["README.md"].decode()
    assert "| round | alpha add1 | alpha add2 | alpha add3 | gap add1 |" in text
    for record in trainer.round_records:  # one row per round, with its mask density
        assert f"| {record['round']} | {record['merge/alpha/add1']:.4g} |" in text
    assert "merge_method: metis" in text and "@inproceedings{im2026metis" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-metis")' in text
    # the token is read by huggingface_hub itself: never passed, written or logged by us
    assert ("init", {"token_given": False}) in api.calls
    assert all(SECRET.encode() not in content for content in files.values())
    assert SECRET not in caplog.text


def test_builtin_base_is_named_by_its_hub_id_with_its_license():
    info = card_info_for("model", "ties", "merge", "smollm2-135m-instruct", sources=["someone/expert-a"])
    meta = render_card(info).data.to_dict()
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "someone/expert-a"]
    assert meta["base_model_relation"] == "merge" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and "ties" in meta["tags"]


@pytest.fixture
def adapter_folder(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(make_tiny_model(64), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_dry_run_stages_and_lists_without_network(tmp_path, adapter_folder, monkeypatch, capsys):
    monkeypatch.setattr("metis_hf.hub.HfApi", NoNetwork)
    stage = tmp_path / "stage"
    assert main(["push", str(adapter_folder), "me/x", "--dry-run", "--stage-dir", str(stage)]) == 0
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "adapter_config.json" in out
    assert sorted(p.name for p in stage.iterdir()) == sorted(p.name for p in adapter_folder.iterdir())
    staged, source = (
        load_file(stage / "adapter_model.safetensors"),
        load_file(adapter_folder / "adapter_model.safetensors"),
    )
    assert staged.keys() == source.keys() and all(torch.equal(staged[k], source[k]) for k in source)


def test_push_to_a_revision_creates_the_branch(adapter_folder, api):
    result = push_folder(adapter_folder, "me/x", revision="dev", private=True, commit_message="m")
    assert (
        "create_branch",
        {"repo_id": "me/x", "branch": "dev", "exist_ok": True, "repo_type": "model"},
    ) in api.calls
    upload = _uploaded(api)
    assert upload["revision"] == "dev" and upload["commit_message"] == "m"
    assert next(kw for n, kw in api.calls if n == "create_repo")["private"] is True
    assert not result.staged_dir.exists()  # the temporary stage is cleaned up


@pytest.mark.parametrize(
    "repo_id,setup,message",
    [
        ("not a repo!", "adapter", "Invalid repository id 'not a repo!'"),
        ("a/b/c", "adapter", "Invalid repository id 'a/b/c'"),
        ("me/x", "missing", "does not exist"),
        ("me/x", "empty", "holds no model weights"),
        ("me/x", "pickle", "pickle weights only (pytorch_model.bin)"),
    ],
)
@pytest.mark.bad_input
def test_bad_input_fails_before_any_network_call(
    tmp_path, adapter_folder, monkeypatch, capsys, repo_id, setup, message
):
    monkeypatch.setattr("metis_hf.hub.HfApi", NoNetwork)
    folder = {"adapter": adapter_folder, "missing": tmp_path / "nope", "empty": tmp_path / "empty"}.get(setup)
    if setup == "empty":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    if setup == "pickle":
        folder = tmp_path / "pickled"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    assert main(["push", str(folder), repo_id]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.bad_input
def test_pickle_is_pushed_only_when_allowed(tmp_path, api):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    assert main(["push", str(folder), "me/p", "--allow-pickle"]) == 0
    assert "pytorch_model.bin" in _uploaded(api)["files"]


def test_merge_push_to_hub_uploads_the_merge(tmp_path, adapter_folder, api, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = {
        "merge_method": "ties",
        "models": [{"model": str(adapter_folder)}] * 2,
        "parameters": {"density": 0.5},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--push-to-hub", "me/merged"]) == 0
    upload = _uploaded(api)
    assert upload["repo_id"] == "me/merged" and upload["commit_message"] == "metis-hf merge"
    text = upload["files"]["README.md"].decode()
    assert "## Merge configuration" in text and "merge_method: ties" in text
    written = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in content for content in written)
    assert SECRET not in capsys.readouterr().out


@pytest.mark.bad_input
def test_invalid_repo_id_stops_merge_before_it_runs(tmp_path, adapter_folder, monkeypatch, capsys):
    import yaml

    config = {"merge_method": "ties", "models": [{"model": str(adapter_folder)}] * 2}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--push-to-hub", "bad id"]) == 2
    assert "Invalid repository id" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_staging_does_not_write_through_hard_links(tmp_path, adapter_folder):
    info = card_info_for("adapter", "metis", "merge", "test-org/base")
    from metis_hf.hub import write_card

    write_card(adapter_folder, info)
    before = (adapter_folder / "adapter_config.json").read_text()
    stage_folder(adapter_folder, tmp_path / "stage", "me/x")
    assert (adapter_folder / "adapter_config.json").read_text() == before
    assert (
        json.loads((tmp_path / "stage" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "test-org/base"
    )
    assert "path/to/this/folder" in (adapter_folder / "README.md").read_text()
    assert '"me/x"' in (tmp_path / "stage" / "README.md").read_text()


def test_card_results_name_each_dataset_and_an_unscored_card_has_no_model_index(tmp_path):
    from metis_hf.data import TaskSpec
    from metis_hf.evaluation import TaskScore
    from metis_hf.evaluation.suite import card_results
    from metis_hf.hub import read_card_info, write_card

    specs = [
        TaskSpec(name="sums", dataset="chain_sum", seed=3, test_size=5, generator_config={"max_terms": 2}),
        TaskSpec(name="qa", source="hub", dataset="owner/qa", config_name="en", splits={"test": "dev"}),
        TaskSpec(name="mine", source="file", dataset=str(tmp_path / "secret-folder" / "mine.jsonl")),
    ]
    scores = {s.name: TaskScore(s.name, score=v, exact_match=v, n=4) for s, v in zip(specs, (0.6, 0.2, 1.0))}
    results = card_results(scores, specs, "test")
    info = card_info_for("adapter", "metis", "many_shot", None, tasks=list(scores), results=results)
    (tmp_path / "card").mkdir()
    (tmp_path / "plain").mkdir()
    write_card(tmp_path / "card", info)
    text = (tmp_path / "card" / "README.md").read_text()
    assert "secret-folder" not in text  # a local file is named by its task, not its path
    read_back = ModelCard.load(tmp_path / "card" / "README.md").data.eval_results
    found = {r.metric_name.removesuffix(" exact_match"): r for r in read_back}
    assert {t: r.metric_value for t, r in found.items()} == pytest.approx(
        {"sums": 0.6, "qa": 0.2, "mine": 1.0, "Avg": 0.6, "Worst": 0.2}
    )
    # the items scored (4: a --limit'ed split), not the split's size (5)
    assert found["sums"].dataset_args == {"generator": "chain_sum", "seed": 20_003, "size": 4, "max_terms": 2}
    assert (found["qa"].dataset_type, found["qa"].dataset_config, found["qa"].dataset_split) == (
        "owner/qa",
        "en",
        "dev",
    )
    assert found["mine"].dataset_type == "local" and found["Avg"].dataset_type == "metis-hf/multi-task"
    assert read_card_info(tmp_path / "card").results == results  # metis_card.json keeps them for push
    write_card(tmp_path / "plain", card_info_for("adapter", "metis", "many_shot", None))
    assert "model-index" not in (tmp_path / "plain" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.eval_results is None
