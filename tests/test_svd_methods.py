"""Iso-C, Iso-CTS and TSV-M against the authors' algorithms, the core space against the dense one,
FedAvg's weights (issue 20).

The reference functions below transcribe the authors' code (iso-merging's ``iso_c``/``iso_cts`` as
FusionBench ships them, and task_singular_vectors' ``compute_and_sum_svd_mem_reduction``) loop for
loop, in float64; ours run in float32. Tolerance: 1e-4 relative to the largest entry.
"""

from __future__ import annotations

import pytest
import torch

from metis_hf.merging import merge
from metis_hf.merging.task_vectors import lora_to_dense, merge_lora_states


def authors_iso_c(tvs):
    total = sum(tvs)
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    return u @ torch.diag(torch.ones_like(s) * s.mean()) @ v


def authors_iso_cts(tvs, fraction):
    shape, count = tvs[0].shape, len(tvs)
    common = int(min(shape) * fraction)
    specific_total = round((min(shape) - common) / count) * count
    common = min(shape) - specific_total
    u, s, v = torch.linalg.svd(sum(tvs), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per_task = int((min(shape) - common) / count)
    all_u, all_s, all_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
    for i, w in enumerate(tvs):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        all_u[:, i * per_task : (i + 1) * per_task] = ut[:, :per_task]
        all_s[i * per_task : (i + 1) * per_task] = st[:per_task]
        all_v[i * per_task : (i + 1) * per_task, :] = vt[:per_task, :]
    end = count * per_task
    all_u[:, end : end + common], all_s[end : end + common], all_v[end : end + common, :] = cu, cs, cv
    uu, _, vu = torch.linalg.svd(all_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(all_v, full_matrices=False)
    return (uu @ vu) @ torch.diag(torch.ones_like(all_s) * all_s.mean()) @ (uv @ vv)


def authors_tsv_m(tvs):
    sv_reduction = 1 / len(tvs)
    for i, vec in enumerate(tvs):
        u, s, vh = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def _close(ours, reference):
    reference = reference.to(ours.dtype)
    tolerance = 1e-4 * float(reference.abs().max())
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=0)


# Shapes whose rank does not divide by T (zero columns in TSV-M's stack; Iso-CTS's rounding).
CASES = [((12, 9), 3), ((10, 7), 2), ((7, 11), 4), ((16, 16), 5)]


@pytest.mark.parametrize("shape,count", CASES)
def test_svd_methods_equal_the_authors_algorithms(shape, count):
    generator = torch.Generator().manual_seed(sum(shape) + count)
    tvs = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)]
    ours_input = [t.float() for t in tvs]
    _close(merge("iso_c", ours_input), authors_iso_c(tvs))
    _close(merge("tsv_m", ours_input), authors_tsv_m(tvs))
    for fraction in (0.8, 0.5):
        _close(merge("iso_cts", ours_input, common_space_fraction=fraction), authors_iso_cts(tvs, fraction))
    _close(merge("iso_c", ours_input, scale=0.3), 0.3 * authors_iso_c(tvs))


def test_non_matrices_are_averaged_then_scaled():
    vectors = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0])]
    for method in ("iso_c", "iso_cts", "tsv_m"):
        torch.testing.assert_close(merge(method, vectors, scale=2.0), torch.tensor([4.0, 2.0, 2.0]))


def test_low_rank_sums_keep_only_their_numerical_rank():
    """A sum of rank-2 updates: the authors' Iso-C would add min(m, n) - rank arbitrary directions
    at the mean singular value; ours flattens the nonzero spectrum and adds nothing."""
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(20, 2, generator=g) @ torch.randn(2, 15, generator=g) for _ in range(3)]
    merged = merge("iso_c", updates)
    s_sum = torch.linalg.svdvals(sum(updates))
    s_merged = torch.linalg.svdvals(merged)
    assert int((s_merged > 1e-4 * s_merged[0]).sum()) == 6
    torch.testing.assert_close(s_merged[:6], torch.full((6,), float(s_sum[:6].mean())), rtol=1e-4, atol=0)
    assert int((torch.linalg.svdvals(authors_iso_c(updates)) > 1e-4).sum()) == 15  # the authors' on it
    merged = merge("tsv_m", updates)  # budget 15 // 3 = 5 > rank 2: each task keeps its 2 directions
    assert int((torch.linalg.svdvals(merged) > 1e-4 * float(torch.linalg.svdvals(merged)[0])).sum()) == 6


def _adapters(ranks, m=24, n=18, modules=("q", "v"), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {f"model.{name}.lora_A.weight": torch.randn(r, n, generator=g) * 0.3 for name in modules}
        | {f"model.{name}.lora_B.weight": torch.randn(m, r, generator=g) * 0.3 for name in modules}
        for r in ranks
    ]


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c", "iso_cts", "tsv_m", "fedavg"])
@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_core_space_equals_the_dense_space(method, ranks):
    """Exact (rank sum(r) output) and truncated to rank 4: the core merge's update equals the dense
    merge's, for adapters of equal and of different ranks and scalings. (Iso-C and Iso-CTS give a
    flat spectrum, whose rank-4 truncation is any 4 of its equal directions: compared exact only.)"""
    states = _adapters(ranks)
    scalings = [16 / r for r in ranks]
    for rank in (sum(ranks),) if method.startswith("iso") else (sum(ranks), 4):
        merged = {}
        for space in ("dense", "core"):
            state, error = merge_lora_states(
                method, states, space=space, rank=rank, scaling=scalings, output_scaling=2.0
            )
            merged[space] = (lora_to_dense(state, 2.0), error)
        for key, dense in merged["dense"][0].items():
            _close(merged["core"][0][key], dense)
        assert merged["core"][1] == pytest.approx(merged["dense"][1], abs=1e-5)
        assert (merged["core"][1] < 1e-5) == (rank == sum(ranks))


def test_the_dense_reference_of_the_core_is_right():
    """Independently of merge_lora_states: task arithmetic of s_t B_t A_t, by hand."""
    states = _adapters((2, 4, 8), seed=3)
    scalings = [16 / r for r in (2, 4, 8)]
    state, _ = merge_lora_states(
        "task_arithmetic", states, space="core", rank=14, scaling=scalings, output_scaling=1.0
    )
    for module in ("q", "v"):
        expected = sum(
            s * st[f"model.{module}.lora_B.weight"] @ st[f"model.{module}.lora_A.weight"]
            for s, st in zip(scalings, states)
        )
        got = state[f"model.{module}.lora_B.weight"] @ state[f"model.{module}.lora_A.weight"]
        _close(got, expected)


@pytest.mark.bad_input
def test_matrix_methods_refuse_the_lora_space():
    states = _adapters((4, 4))
    with pytest.raises(ValueError, match="iso_c merges each layer's update matrix.*'core'"):
        merge_lora_states("iso_c", states, space="lora", rank=4)
    with pytest.raises(ValueError, match="common_space_fraction must be in"):
        merge("iso_cts", [torch.ones(3, 3)], common_space_fraction=0.0)


def test_fedavg_weights_by_example_counts():
    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    torch.testing.assert_close(
        merge("fedavg", vectors, example_counts=[100, 300, 600]), torch.tensor([0.7, 0.9])
    )
    torch.testing.assert_close(merge("fedavg", vectors), torch.tensor([2 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="example_counts must be >= 0"):
        merge("fedavg", vectors, example_counts=[0, 0, 0])


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts", "fedavg"])
def test_many_shot_runs_the_new_methods(tmp_path, tiny_tokenizer, method):
    """Many-shot through MetisTrainer: the SVD methods default to the core space, FedAvg weights by
    each task's training examples (20, 16, 12), and the merged adapter is the method's merge of the
    task adapters' last local results, returned to rank r (tsv_m, fedavg: checked by hand)."""
    from peft import LoraConfig

    from metis_hf import MetisConfig, MetisTrainer
    from metis_hf.merging.task_vectors import lora_scaling, lora_state
    from tests.conftest import make_tiny_model
    from tests.test_trainer import LORA, TRAIN, VAL

    args = MetisConfig(
        output_dir=str(tmp_path), use_cpu=True, num_rounds=2, local_steps=2, max_length=64,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, disable_tqdm=True, merge_method=method,
    )  # fmt: skip
    assert args.merge_space == ("lora" if method == "fedavg" else "core")
    trainer = MetisTrainer(
        make_tiny_model(len(tiny_tokenizer)), args, TRAIN, VAL, processing_class=tiny_tokenizer,
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    trainer.train()
    last = trainer.round_records[-1]
    if method == "fedavg":
        assert [last[f"merge/alpha/{t}"] for t in TRAIN] == pytest.approx([20 / 48, 16 / 48, 12 / 48])
    else:
        assert 0 <= last["merge/truncation_error"] < 1
    tasks = [lora_state(trainer.peft_model, t) for t in TRAIN]
    merged = lora_state(trainer.peft_model, "default")
    scaling = lora_scaling(LORA["r"], LORA["lora_alpha"])
    if method == "fedavg":
        for key in merged:
            expected = sum(w * t[key] for w, t in zip([20 / 48, 16 / 48, 12 / 48], tasks))
            torch.testing.assert_close(merged[key], expected)
    elif method == "tsv_m":  # scale 1/T; the rank-r truncation of the dense merge
        dense = [lora_to_dense(t, scaling) for t in tasks]
        for module, got in lora_to_dense(merged, scaling).items():
            full = merge("tsv_m", [d[module] for d in dense], scale=1 / 3)
            u, s, vh = torch.linalg.svd(full)
            _close(got, (u[:, : LORA["r"]] * s[: LORA["r"]]) @ vh[: LORA["r"]])
    with pytest.raises(ValueError, match="merges each layer's update matrix"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="iso_c", merge_space="lora")


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv_m"])
def test_merge_command_merges_adapters_of_different_ranks_exactly(tmp_path, method):
    """`metis-hf merge` in the core space: LoRAs of rank 2, 4 and 8 become one rank-14 adapter that
    PEFT loads, whose update is the method's dense merge of the three updates."""
    import yaml
    from peft import PeftModel

    from metis_hf.commands import main
    from tests.conftest import make_tiny_model
    from tests.test_merge_files import VOCAB, _lora

    folders, deltas = [], []
    for i, rank in enumerate((2, 4, 8)):
        adapter = _lora(make_tiny_model(VOCAB), r=rank, seed=i)
        adapter.save_pretrained(tmp_path / f"a{rank}")
        folders.append(tmp_path / f"a{rank}")
        deltas.append(_peft_deltas(adapter))
    config = {"merge_method": method, "models": [{"model": str(f)} for f in folders], "space": "core"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out")]) == 0
    merged = PeftModel.from_pretrained(make_tiny_model(VOCAB), str(tmp_path / "out"))
    assert merged.peft_config["default"].r == 14
    got = _peft_deltas(merged)
    assert set(got) == set(deltas[0])
    for name, delta in got.items():
        _close(delta, merge(method, [d[name] for d in deltas]))


def _peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """Each LoRA module's update as PEFT computes it (scaling * B @ A)."""
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")
    }
