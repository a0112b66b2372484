"""Knowledge retention: BIG-bench-format multiple choice by answer log-likelihood, the sdist cache."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metis_hf.errors import DataUnavailableError
from metis_hf.evaluation.retention import (
    batch_choice_log_likelihoods,
    bigbench_task_file,
    choice_log_likelihoods,
    extract_bigbench,
    load_multiple_choice,
    multiple_choice_accuracy,
)

FIXTURE = Path(__file__).parent / "fixtures" / "retention" / "task.json"


def test_task_file_items_keep_one_best_choice_and_the_training_prompt_format():
    items = load_multiple_choice(FIXTURE)
    assert len(items) == 6  # 8 examples; a tie and a single choice dropped
    assert items[0] == {
        "prompt": "Pick the right answer.\nWhich is a fruit?\nAnswer:",
        "choices": ["apple", "chair", "river"],
        "correct": 0,
    }
    assert items[2]["correct"] == 2
    sampled = load_multiple_choice(FIXTURE, size=3, seed=1)
    assert len(sampled) == 3 and sampled == load_multiple_choice(FIXTURE, size=3, seed=1)


def _log_likelihood_by_hand(model, tokenizer, prompt, choice):
    """One unpadded forward per choice; the log-probability of each choice token, summed."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    choice_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + choice_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    total = 0.0
    for offset, token in enumerate(choice_ids):
        position = len(prompt_ids) + offset - 1
        total += float(F.log_softmax(logits[position], dim=-1)[token])
    return total


def test_choice_log_likelihoods_and_accuracy_against_unpadded_forwards(tiny_model, tiny_tokenizer):
    items = load_multiple_choice(FIXTURE)
    expected = [
        [_log_likelihood_by_hand(tiny_model, tiny_tokenizer, item["prompt"], c) for c in item["choices"]]
        for item in items
    ]
    for item, want in zip(items, expected):  # choices of different token lengths share one padded batch
        assert choice_log_likelihoods(
            tiny_model, tiny_tokenizer, item["prompt"], item["choices"]
        ) == pytest.approx(want, abs=1e-4)
    # every item in one batch: prompts of different lengths (left-padded), 2 or 3 choices each
    assert len({len(tiny_tokenizer(item["prompt"])["input_ids"]) for item in items}) > 1
    assert len({len(item["choices"]) for item in items}) > 1
    got = batch_choice_log_likelihoods(tiny_model, tiny_tokenizer, items)
    assert [len(g) for g in got] == [len(w) for w in expected]
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, abs=1e-4)
    # the model's own best choice marked right on the first 4 items, a worse one on the last 2
    relabelled = []
    for i, item in enumerate(items):
        scores = [
            _log_likelihood_by_hand(tiny_model, tiny_tokenizer, item["prompt"], c) for c in item["choices"]
        ]
        best = max(range(len(scores)), key=scores.__getitem__)
        relabelled.append({**item, "correct": best if i < 4 else (best + 1) % len(scores)})
    result = multiple_choice_accuracy(tiny_model, tiny_tokenizer, relabelled, batch_size=4)  # 4 + 2
    assert result["items"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0] and result["accuracy"] == pytest.approx(4 / 6)
    assert result["picks"] == [item["correct"] for item in relabelled[:4]] + [
        (item["correct"] - 1) % len(item["choices"]) for item in relabelled[4:]
    ]


def test_the_cache_travels_under_the_name_the_model_takes_also_under_peft(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch_choice_log_likelihoods(model, tiny_tokenizer, load_multiple_choice(FIXTURE)[:2])
    # a renamed argument passed under its old name warns that it is deprecated
    assert not [w for w in caught if "deprecated" in str(w.message)]


def _sdist(path: Path, tasks: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in {
            **{f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": d for t, d in tasks.items()},
            "bigbench-1.0.0/bigbench/benchmark_tasks/other/sub/task.json": b"{}",
            "bigbench-1.0.0/setup.py": b"",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.bad_input
def test_extract_bigbench_fills_the_cache_and_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BIG-bench task 'toy' is not in .*python -m metis_hf"):
        bigbench_task_file("toy")
    sdist = _sdist(
        tmp_path / "bigbench-1.0.0.tar.gz", {"toy": FIXTURE.read_bytes(), "two": b'{"examples": []}'}
    )
    written = extract_bigbench(sdist, ["toy"])
    assert written == [tmp_path / "bigbench" / "toy" / "task.json"] == [bigbench_task_file("toy")]
    assert json.loads(written[0].read_text())["name"] == "toy_multiple_choice"
    assert not (tmp_path / "bigbench" / "two").exists()  # only what was asked for
    with pytest.raises(ValueError, match="no bigbench/benchmark_tasks/<task>/task.json for sub, absent"):
        extract_bigbench(sdist, ["sub", "absent"])
    with pytest.raises(ValueError, match="no multiple-choice example"):
        load_multiple_choice(extract_bigbench(sdist, ["two"])[0])


def test_missing_tasks_are_fetched_in_one_download_checked_against_the_published_sha256(
    tmp_path, monkeypatch
):
    from metis_hf.evaluation import retention

    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path))
    sdist = _sdist(
        tmp_path / "bigbench-1.0.0.tar.gz", {"toy": FIXTURE.read_bytes(), "two": FIXTURE.read_bytes()}
    )
    served = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(sdist.stat().st_size)}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        served.append(url)
        return Response(sdist.read_bytes())

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(DataUnavailableError, match="sha256 .* is not the published one"):  # not PyPI's file
        retention.ensure_bigbench(["toy"])
    assert not (tmp_path / "bigbench" / "toy").exists()  # nothing half-written
    import hashlib

    monkeypatch.setattr(retention, "BIGBENCH_SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    files = retention.ensure_bigbench(["toy", "two", "toy"])
    assert files == {t: tmp_path / "bigbench" / t / "task.json" for t in ("toy", "two")} and len(served) == 2
    retention.ensure_bigbench(["two"])
    assert len(served) == 2  # cached: no third download


@pytest.mark.bad_input
def test_an_unreachable_download_is_one_line_from_the_command_line(tmp_path, monkeypatch, capsys):
    """Offline with an empty cache: the command says how to provide the sdist, with no traceback."""
    from metis_hf.commands import main
    from tests.conftest import make_tokenizer, write_tiny_recipe

    monkeypatch.setenv("METIS_HF_CACHE", str(tmp_path / "cache"))

    def urlopen(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    recipe = write_tiny_recipe(
        tmp_path,
        make_tokenizer(),
        evaluation={"retention": [{"name": "dates", "bigbench": "date_understanding"}]},
    )
    assert main(["compare", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (
        "error: Could not download" in error and "--sdist bigbench-1.0.0.tar.gz date_understanding" in error
    )
    assert "Traceback" not in error
