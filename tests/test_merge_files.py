"""`metis-hf merge` and the mergekit bridge on tiny adapters and checkpoints written to disk."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metis_hf.commands import main
from metis_hf.merging import merge
from metis_hf.merging.task_vectors import (
    dense_to_lora,
    load_lora_state,
    lora_parameters,
    lora_state,
    lora_to_dense,
    merge_state_dicts,
)
from tests.conftest import make_tiny_model

VOCAB = 64


def _lora(model, r=4, seed=0, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # PEFT initialises B to zero; give each adapter a real delta
    return peft_model


@pytest.fixture
def adapter_dirs(tmp_path):
    base = make_tiny_model(VOCAB)
    base.save_pretrained(tmp_path / "base")
    dirs = []
    for i in range(3):
        model = _lora(make_tiny_model(VOCAB), seed=i + 1)
        model.save_pretrained(tmp_path / f"adapter{i}")
        dirs.append(tmp_path / f"adapter{i}")
    return tmp_path, dirs


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_merge_adapters_cli_equals_library(adapter_dirs):
    root, dirs = adapter_dirs
    gaps = [0.2, 0.9, -0.1]
    config = {
        "merge_method": "metis",
        "models": [{"model": str(d), "parameters": {"loss_gap": g}} for d, g in zip(dirs, gaps)],
        "parameters": {"temperature": 1.0, "k": 2},
    }
    assert main(["merge", _write(root / "m.yaml", config), str(root / "out")]) == 0
    states = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    expected = merge_state_dicts("metis", states, loss_gaps=gaps, temperature=1.0, k=2)
    written = load_file(str(root / "out" / "adapter_model.safetensors"))
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key])
    # PEFT loads it onto the base model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "out")
    live = lora_state(model)
    torch.testing.assert_close(live[next(iter(expected))], expected[next(iter(expected))])
    card = (root / "out" / "README.md").read_text()
    assert "merge_method: metis" in card and "library_name: peft" in card


@pytest.mark.bad_input
def test_failed_merge_leaves_no_output(adapter_dirs):
    root, dirs = adapter_dirs
    config = {
        "merge_method": "ties",
        "models": [{"model": str(d)} for d in dirs],
        "parameters": {"density": 2.0},
    }
    assert main(["merge", _write(root / "bad.yaml", config), str(root / "out")]) == 2
    assert not (root / "out").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.bad_input
def test_mismatched_adapters_are_named(adapter_dirs, tmp_path):
    root, dirs = adapter_dirs
    other = _lora(make_tiny_model(VOCAB), r=2)
    other.save_pretrained(tmp_path / "rank2")
    config = {"merge_method": "ties", "models": [{"model": str(dirs[0])}, {"model": str(tmp_path / "rank2")}]}
    with pytest.raises(ValueError, match=r"rank2 has r=2"):
        from metis_hf.workflows.merge import load_merge_config, run_merge

        run_merge(load_merge_config(_write(root / "c.yaml", config))[0], root / "o2", progress=False)
    targets = _lora(make_tiny_model(VOCAB), targets=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="lacks"):
        merge_state_dicts("ties", [lora_state(_lora(make_tiny_model(VOCAB))), lora_state(targets)])


@pytest.mark.bad_input
def test_bad_config_names_the_key(adapter_dirs):
    root, dirs = adapter_dirs
    config = {"merge_method": "ties", "models": [{"model": str(dirs[0]), "parameters": {"wieght": 1}}]}
    assert main(["merge", _write(root / "k.yaml", config), str(root / "o")]) == 2
    config = {"merge_method": "nope", "models": [{"model": str(dirs[0])}]}
    assert main(["merge", _write(root / "n.yaml", config), str(root / "o")]) == 2
    (root / "broken.yaml").write_text("models: [\n")
    assert main(["merge", str(root / "broken.yaml"), str(root / "o")]) == 2


@pytest.mark.bad_input
@pytest.mark.parametrize("space", ["lora", "dense", "core"])
@pytest.mark.parametrize("rank", [2, 100, 10**11])
def test_an_output_rank_is_refused_where_it_cannot_apply(adapter_dirs, capsys, space, rank):
    """In the lora space the factors keep their rank (r: 2 over rank-4 tensors would break PEFT's
    load); in the others a rank past every layer's width (32 here) would pad or exhaust memory."""
    root, dirs = adapter_dirs
    config = {"merge_method": "task_arithmetic", "models": [{"model": str(d)} for d in dirs]}
    config.update(space=space, rank=rank)
    code = main(["merge", _write(root / "r.yaml", config), str(root / "out")])
    if space != "lora" and rank == 2:  # a truncation the spaces are for
        assert code == 0 and json.loads((root / "out" / "adapter_config.json").read_text())["r"] == 2
        return
    assert code == 2 and not (root / "out").exists()
    error = capsys.readouterr().err
    assert ("keeps its inputs' rank" if space == "lora" else f"rank {rank} exceeds") in error


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("r"), "r is missing; it must be a positive integer"),
        (lambda c: c.pop("lora_alpha"), "lora_alpha is missing; it must be a positive number"),
        (lambda c: c.update(r="4"), "r is '4'; it must be a positive integer"),
        (lambda c: c.update(lora_alpha=None), "lora_alpha is None"),
        # in the lora space the ranks must also agree across adapters, which fails first
        (lambda c: c.update(r=8), ("has rank 4, but adapter_config.json says r=8", "adapter1 has r=8")),
        (lambda c: [c], "holds a JSON list, not an object"),
    ],
)
@pytest.mark.parametrize("space", ["lora", "core"])
def test_a_broken_adapter_config_is_named(adapter_dirs, capsys, change, message, space):
    root, dirs = adapter_dirs
    path = dirs[1] / "adapter_config.json"
    adapter_config = json.loads(path.read_text())
    changed = change(adapter_config)
    path.write_text(json.dumps(changed if isinstance(changed, list) else adapter_config))
    config = {"merge_method": "task_arithmetic", "space": space, "models": [{"model": str(d)} for d in dirs]}
    assert main(["merge", _write(root / "b.yaml", config), str(root / "out")]) == 2
    error = capsys.readouterr().err
    messages = message if isinstance(message, tuple) else (message,)
    assert any(m in error for m in messages) and "adapter1" in error and "Traceback" not in error


@pytest.mark.bad_input
def test_pickle_only_folder_is_refused(tmp_path):
    from metis_hf.workflows.merge import safetensors_files

    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights"):
        safetensors_files(tmp_path)


def _checkpoints(tmp_path, count=2):
    """A saved base and `count` saved "fine-tuned" copies (base plus small seeded noise)."""
    base = make_tiny_model(VOCAB, seed=0)
    base.save_pretrained(tmp_path / "base")
    tuned = []
    for i in range(count):
        model = make_tiny_model(VOCAB, seed=0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
        model.save_pretrained(tmp_path / f"ft{i}")
        tuned.append(model)
    return base, tuned


def test_merge_full_checkpoints_sharded(tmp_path):
    base, tuned = _checkpoints(tmp_path)
    config = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)],
        "parameters": {"density": 0.5},
        "max_shard_size_mb": 0,  # every tensor its own shard: exercises the index
    }
    assert main(["merge", _write(tmp_path / "c.yaml", config), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base_sd, sds = base.state_dict(), [m.state_dict() for m in tuned]
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = base_sd[key] + merge("ties", [sd[key] - base_sd[key] for sd in sds], density=0.5)
    torch.testing.assert_close(merged.state_dict()[key], expected)


def test_lora_state_round_trip_keeps_parameter_identity():
    model = _lora(make_tiny_model(VOCAB))
    params = lora_parameters(model)
    ids = {k: id(p) for k, p in params.items()}
    new = {k: torch.full_like(p, 0.5) for k, p in params.items()}
    load_lora_state(model, new)
    after = lora_parameters(model)
    assert {k: id(p) for k, p in after.items()} == ids
    assert all(bool((p == 0.5).all()) for p in after.values())
    assert list(params) == sorted(params)


def test_dense_space_matches_peft_and_truncation_is_measured():
    model = _lora(make_tiny_model(VOCAB))
    state = lora_state(model)
    dense = lora_to_dense(state, scaling=8 / 4)
    prefix = next(iter(dense))
    layer = model.get_submodule(prefix)
    torch.testing.assert_close(dense[prefix], layer.get_delta_weight("default"))
    # a rank-4 delta comes back exactly at rank 4 and loses something at rank 2
    back, report = dense_to_lora(dense, rank=4, scaling=2.0)
    torch.testing.assert_close(lora_to_dense(back, 2.0)[prefix], dense[prefix], atol=1e-5, rtol=1e-4)
    assert report.overall < 1e-5
    _, lossy = dense_to_lora(dense, rank=2, scaling=2.0)
    assert 0.05 < lossy.overall < 1.0


def test_mergekit_yaml_runs_metis(tmp_path):
    base, tuned = _checkpoints(tmp_path)
    config = {
        "merge_method": "metis",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / f"ft{i}"), "parameters": {"loss_gap": 0.5 * i}} for i in range(2)
        ],
        "parameters": {"k": 1},
        "dtype": "float32",
    }
    assert main(["mergekit-yaml", _write(tmp_path / "mk.yaml", config), str(tmp_path / "mk")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "mk").state_dict()
    key = "model.layers.1.mlp.up_proj.weight"
    sds = [m.state_dict() for m in tuned]
    expected = base.state_dict()[key] + merge(
        "metis", [sd[key] - base.state_dict()[key] for sd in sds], loss_gaps=[0, 0.5], k=1
    )
    torch.testing.assert_close(merged[key], expected)
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.bad_input
def test_mergekit_yaml_reads_relative_local_folders(tmp_path, monkeypatch):
    """`fx/ft1` (no ./) is a local folder, not a Hub id: the merge and its card are written."""
    monkeypatch.chdir(tmp_path)
    _checkpoints(tmp_path / "fx")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "fx/base",
        "models": [{"model": f"fx/ft{i}", "parameters": {"weight": 0.5}} for i in range(2)],
        "dtype": "float32",
    }
    assert main(["mergekit-yaml", _write(tmp_path / "rel.yaml", config), "merged"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "README.md").is_file()
    assert yaml.safe_load((tmp_path / "rel.yaml").read_text()) == config  # the user's file untouched


def test_apply_dense_deltas_folds_a_merged_delta_into_the_base():
    from metis_hf.merging.task_vectors import apply_dense_deltas

    adapters = [_lora(make_tiny_model(VOCAB, seed=0), seed=s) for s in (1, 2)]
    dense = [lora_to_dense(lora_state(a), scaling=2.0) for a in adapters]
    merged = merge_state_dicts("task_arithmetic", dense, weights=[0.5, 0.5])
    base = make_tiny_model(VOCAB, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    prefix = "base_model.model."
    apply_dense_deltas(base, merged, prefix_map=lambda key: key.removeprefix(prefix) + ".weight")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        base.state_dict()[key], before[key] + merged[prefix + key.removesuffix(".weight")]
    )
    untouched = "model.layers.0.self_attn.k_proj.weight"  # not a LoRA target
    assert torch.equal(base.state_dict()[untouched], before[untouched])
    with pytest.raises(ValueError, match="names no parameter"):
        apply_dense_deltas(base, {"nope": torch.zeros(1)})


def test_loss_gaps_of_finished_adapters(tiny_tokenizer):
    from datasets import Dataset

    from metis_hf.training.loss import compute_loss_gaps, task_loss

    model = _lora(make_tiny_model(len(tiny_tokenizer), seed=0), seed=1)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.normal_(0, 0.2)
    data = {
        "one": Dataset.from_list([{"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5\n\n"}]),
        "two": Dataset.from_list([{"prompt": "Find\nAnswer:", "completion": " 6\n\n"}]),
    }
    gaps = compute_loss_gaps(model, tiny_tokenizer, data, {"one": "default", "two": "second"})
    with model.disable_adapter():
        base = {t: task_loss(model, tiny_tokenizer, d) for t, d in data.items()}
    model.set_adapter("second")
    assert gaps["two"] == pytest.approx(base["two"] - task_loss(model, tiny_tokenizer, data["two"]), abs=1e-6)
    model.set_adapter("default")
    assert gaps["one"] == pytest.approx(base["one"] - task_loss(model, tiny_tokenizer, data["one"]), abs=1e-6)
    with pytest.raises(ValueError, match="Tasks differ"):
        compute_loss_gaps(model, tiny_tokenizer, data, {"one": "default"})


def test_the_dense_space_is_named_dense_and_delta_still_works(adapter_dirs, tmp_path):
    """'delta' read as METIS's mask threshold: the space is 'dense' now; the old name warns and
    gives the same merge."""
    from metis_hf import MetisConfig
    from metis_hf.workflows.merge import MergeConfig, ModelEntry, run_merge

    with pytest.warns(FutureWarning, match="'delta' is now called 'dense'"):
        assert MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_space="delta").merge_space == "dense"
    message = r"merge_space: merge space must be one of \('lora', 'dense', 'core'\)"
    with pytest.raises(ValueError, match=message):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_space="svd")
    _, dirs = adapter_dirs
    models = [ModelEntry(str(d)) for d in dirs]
    run_merge(MergeConfig("ties", models, space="dense"), tmp_path / "dense", progress=False)
    with pytest.warns(FutureWarning):
        old_name = MergeConfig("ties", models, space="delta")
    run_merge(old_name, tmp_path / "delta", progress=False)
    assert (tmp_path / "dense" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "delta" / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("max_shard_bytes", [0, 300, 1 << 20])
def test_streaming_writer_output_reads_back_with_safetensors(tmp_path, max_shard_bytes):
    """Tensors of every kind a checkpoint holds (bf16, f16, int64, bool, a 0-dim scalar), written
    one at a time, read back equal through safetensors itself (which checks headers and offsets),
    one shard or several with an index transformers follows."""
    from safetensors import safe_open

    from metis_hf.workflows.merge import StreamingShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(13, generator=g).half(),
        "d.ids": torch.arange(9, dtype=torch.int64),
        "e.mask": torch.rand(4, 4, generator=g) > 0.5,
        "f.scale": torch.tensor(2.5),
    }
    layout = [(k, list(v.shape), v.dtype) for k, v in tensors.items()]
    writer = StreamingShardWriter(tmp_path, "model", layout, max_shard_bytes)
    for key, value in tensors.items():
        writer.add(key, value)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    read = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            read.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert set(read) == set(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value)
    index = tmp_path / "model.safetensors.index.json"
    if max_shard_bytes == 1 << 20:
        assert [p.name for p in files] == ["model.safetensors"] and not index.exists()
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(tensors) and len(files) == len(set(weight_map.values())) > 1


def test_streaming_writer_refuses_a_tensor_out_of_plan(tmp_path):
    from metis_hf.workflows.merge import StreamingShardWriter

    writer = StreamingShardWriter(
        tmp_path, "model", [("a", [2], torch.float32), ("b", [3], torch.float32)], 1 << 20
    )
    with pytest.raises(RuntimeError, match="is not the planned next output 'a'"):
        writer.add("b", torch.zeros(3))
    writer.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="Only 1 of the 2 planned tensors"):
        writer.close()
