"""The merge library against PEFT, mergekit, hand-computed values and properties.

Parameter mapping to the peers (written down once, used below):
- PEFT ``merge_utils.<m>(tensors, weights, density)`` = ours ``merge(m, tensors, weights=..., density=...)``
  (scale 1); DARE draws match when PEFT runs under ``torch.manual_seed(s)`` and ours gets ``seed=s``.
- mergekit ``merge_tensors([zeros, *tensors], m, parameters={"weight": w, "density": d}, base_index=0)``
  = ours with unit weights for ties; for DARE, mergekit with ``rescale: false`` (it matches L1
  norms otherwise) equals ours times ``density`` (we rescale by 1/density), and dare_ties needs
  ``normalize: true`` (mergekit's dare_ties sums the agreeing entries without dividing).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_hf.merging import available_methods, loss_gap_weights, merge, register_merge_method
from metis_hf.merging.ties import magnitude_threshold

ATOL = 1e-6
METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "consensus_ta", "metis"]


def vectors(count=3, size=5000, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape or (size,), generator=g) for _ in range(count)]


def test_registry_lists_the_six_methods():
    assert set(METHODS) <= set(available_methods())


# --- golden: PEFT -----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.5, -0.7]])
@pytest.mark.parametrize("density", [0.2, 0.65])
def test_ties_equals_peft(weights, density):
    from peft.utils import merge_utils

    vs = vectors(shape=(40, 70))
    expected = merge_utils.ties(vs, torch.tensor(weights), density=density)
    torch.testing.assert_close(
        merge("ties", vs, weights=weights, density=density), expected, atol=ATOL, rtol=0
    )


def _ties_by_hand(vs, weights, density):
    """TIES transcribed entry by entry: every entry whose magnitude ties the k-th largest is kept
    (our convention), signs elected on the unweighted trimmed entries (sum >= 0 elects +), the
    weighted agreeing entries summed and divided by their count."""
    rows = [v.float().reshape(-1).tolist() for v in vs]
    n = len(rows[0])
    k = int(density * n)
    kept = []
    for row in rows:
        threshold = sorted((abs(x) for x in row), reverse=True)[k - 1]
        kept.append([x if abs(x) >= threshold else 0.0 for x in row])
    out = []
    for i in range(n):
        column = [kept[t][i] for t in range(len(rows))]
        positive = sum(column) >= 0
        agree = [(w, x) for w, x in zip(weights, column) if (x > 0 if positive else x < 0)]
        out.append(sum(w * x for w, x in agree) / max(len(agree), 1))
    return torch.tensor(out).reshape(vs[0].shape), [sum(x != 0 for x in row) for row in kept]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_keeps_every_entry_tied_at_the_threshold(dtype):
    """Magnitudes from a few levels, so the k-th largest is tied: we keep all the ties (more than
    k entries, independent of the entries' order); PEFT's and mergekit's top-k keep exactly k,
    choosing among the ties by position."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.5, 1.0, 1.5, 2.0])
    vs = [(levels[torch.randint(0, 4, (60,), generator=g)] * (torch.randint(0, 2, (60,), generator=g) * 2 - 1)).to(dtype) for _ in range(3)]  # fmt: skip
    weights, density = [1.0, 0.5, 2.0], 0.25  # k = 15
    expected, kept_counts = _ties_by_hand(vs, weights, density)
    assert all(count > 15 for count in kept_counts)  # the threshold really is tied
    got = merge("ties", vs, weights=weights, density=density)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected.to(dtype), atol=0, rtol=0)
    peft_kept = [int((merge_utils.prune(v.float(), density, "magnitude") != 0).sum()) for v in vs]
    assert peft_kept == [15, 15, 15]


def test_ties_equals_peft_on_the_sampled_threshold_path_across_a_chunk_boundary():
    """Past 4 x 2^15 entries the threshold is bracketed by a sample; past 2^18 the merge runs in
    two chunks. Continuous values (no ties): PEFT's exact top-k and ours agree."""
    from metis_hf.merging.chunks import CHUNK_ELEMENTS
    from metis_hf.merging.ties import _SAMPLE

    n = CHUNK_ELEMENTS + 37_003
    assert n > 4 * _SAMPLE
    vs, weights = vectors(3, n, seed=11), [1.0, -0.5, 2.0]
    expected = merge_utils_ties(vs, weights, 0.2)
    torch.testing.assert_close(merge("ties", vs, weights=weights, density=0.2), expected, atol=ATOL, rtol=0)


def test_ties_with_ties_at_the_threshold_on_the_sampled_path():
    from metis_hf.merging.chunks import CHUNK_ELEMENTS

    n = CHUNK_ELEMENTS + 10_001
    vs = [((torch.arange(n, dtype=torch.float32) * (t + 3)) % 101 - 50.0) / 8 for t in range(3)]
    weights, density = [1.0, 1.0, 0.5], 0.3
    k = int(density * n)
    expected = []
    trimmed = []
    for v in vs:
        threshold = float(v.abs().kthvalue(n - k + 1).values)
        trimmed.append(torch.where(v.abs() >= threshold, v, 0.0))
        assert int((v.abs() >= threshold).sum()) > k  # tied
    stacked = torch.stack(trimmed)
    positive = stacked.sum(0) >= 0
    agree = torch.where(positive, stacked > 0, stacked < 0)
    w = torch.tensor(weights).unsqueeze(1)
    expected = (stacked * agree * w).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(
        merge("ties", vs, weights=weights, density=density), expected, atol=ATOL, rtol=0
    )


def merge_utils_ties(vs, weights, density):
    from peft.utils import merge_utils

    return merge_utils.ties(vs, torch.tensor(weights), density=density)


def test_task_arithmetic_equals_peft():
    from peft.utils import merge_utils

    vs, w = vectors(4), [0.3, -1.0, 2.0, 0.25]
    expected = merge_utils.task_arithmetic(vs, torch.tensor(w))
    torch.testing.assert_close(merge("task_arithmetic", vs, weights=w), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]])
def test_dare_equals_peft_under_the_same_seed(method, weights):
    from peft.utils import merge_utils

    vs = vectors(size=600_000)  # larger than one chunk: chunked draws must equal PEFT's one draw
    torch.manual_seed(11)
    expected = getattr(merge_utils, method)(vs, torch.tensor(weights), density=0.4)
    ours = merge(method, vs, weights=weights, density=0.4, seed=11)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


# --- golden: mergekit -------------------------------------------------------------------------


def _mergekit(vs, method, **parameters):
    from mergekit.merge_methods import merge_tensors

    return merge_tensors([torch.zeros_like(vs[0]), *vs], method, parameters=parameters, base_index=0)


def test_ties_and_task_arithmetic_equal_mergekit():
    vs = vectors(shape=(30, 50))
    torch.testing.assert_close(
        merge("ties", vs, density=0.3), _mergekit(vs, "ties", weight=1.0, density=0.3), atol=ATOL, rtol=0
    )
    w = [0.5, 1.0, -2.0]
    torch.testing.assert_close(
        merge("task_arithmetic", vs, weights=w), _mergekit(vs, "task_arithmetic", weight=w), atol=ATOL, rtol=0
    )


def test_dare_equals_mergekit_without_its_norm_rescale():
    vs = vectors()
    torch.manual_seed(5)
    linear = _mergekit(vs, "dare_linear", weight=1.0, density=0.5, rescale=False)
    torch.testing.assert_close(merge("dare_linear", vs, density=0.5, seed=5) * 0.5, linear, atol=ATOL, rtol=0)
    torch.manual_seed(5)
    tied = _mergekit(vs, "dare_ties", weight=1.0, density=0.5, rescale=False, normalize=True)
    torch.testing.assert_close(merge("dare_ties", vs, density=0.5, seed=5) * 0.5, tied, atol=ATOL, rtol=0)


# --- hand-checked METIS and ConsensusTA -------------------------------------------------------


def test_metis_by_hand():
    # Two coordinates, three tasks; alphas given. Coordinate 0: weighted entries 0.5*2=1, 0.25*2=0.5,
    # 0.25*2=0.5, V=2: masks |1|>0.3*1 yes, |0.5|>0.3*1.5 yes, yes -> 3 owners, kept: 2.
    # Coordinate 1: weighted 0.5*4=2, 0.25*0=0, 0.25*0=0, V=2: only task 0 owns it -> dropped.
    vs = [torch.tensor([2.0, 4.0]), torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0])]
    out = merge("metis", vs, alphas=[0.5, 0.25, 0.25], delta=0.3, k=2, beta=1.5)
    assert out.tolist() == [3.0, 0.0]  # beta * 2 and 0


def test_metis_strict_and_consensus_ta_non_strict_differ_on_a_tie():
    # Exactly representable: task 0's entry 0.5 against the rest 1.0 at delta 0.5 is a tie, so
    # METIS (>) gives it no ownership and ConsensusTA (>=) does.
    vs = [torch.tensor([0.5]), torch.tensor([1.0])]
    doubled = [2 * v for v in vs]  # METIS's alphas sum to 1: weighted by 0.5 these are vs again
    assert merge("metis", doubled, alphas=[0.5, 0.5], delta=0.5, k=2).item() == 0.0
    assert merge("consensus_ta", vs, delta=0.5, k=2).item() == 1.5


def _transcribe(vs, weights, delta, k, scale, strict):
    """A direct, coordinate-by-coordinate transcription of docs/method.md §3 and §4."""
    out = []
    for i in range(vs[0].numel()):
        entries = [w * float(v.reshape(-1)[i]) for v, w in zip(vs, weights)]
        total = sum(entries)
        owners = 0
        for e in entries:
            own = abs(e) > delta * abs(total - e) if strict else abs(e) >= delta * abs(total - e)
            owners += own
        out.append(scale * total if owners >= k else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("count,k", [(3, 2), (4, 2), (5, 3)])
def test_metis_and_consensus_ta_match_the_transcription(count, k):
    vs = [v.double() for v in vectors(count, size=300, seed=count)]
    gaps = [0.1 * i - 0.2 for i in range(count)]
    alphas = loss_gap_weights(gaps, temperature=2.0)
    expected = _transcribe(vs, alphas, 0.3, k, 1.2, strict=True)
    torch.testing.assert_close(
        merge("metis", vs, loss_gaps=gaps, k=k, beta=1.2), expected, atol=1e-12, rtol=0
    )
    w = [0.5, 1.0, 1.5, 0.7, 1.1][:count]
    expected = _transcribe(vs, w, 0.4, k, 0.8, strict=False)
    torch.testing.assert_close(
        merge("consensus_ta", vs, weights=w, delta=0.4, k=k, scale=0.8), expected, atol=1e-12, rtol=0
    )


def test_loss_gap_weights_are_a_softmax():
    gaps, temp = [0.5, -1.0, 2.0], 2.0
    exps = [pow(2.718281828459045, g / temp) for g in gaps]
    assert loss_gap_weights(gaps, temp) == pytest.approx([e / sum(exps) for e in exps])


def test_magnitude_threshold_is_exact_on_large_and_structured_inputs():
    for v in [vectors(1, 1_000_003, seed=3)[0], torch.arange(300_000.0) % 997 - 498.0]:
        n = v.numel()
        for density in (0.001, 0.2, 0.5, 0.999):
            expected = float(v.abs().kthvalue(n - int(density * n) + 1).values)
            assert magnitude_threshold(v, density) == expected


# --- properties -------------------------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, width=32)


def _tensors(draw_lists):
    return [torch.tensor(x, dtype=torch.float32) for x in draw_lists]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda t: st.lists(st.lists(finite, min_size=6, max_size=6), min_size=t, max_size=t)
    ),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_task_arithmetic_is_linear(lists, a, b):
    vs = _tensors(lists)
    us = [v.flip(0) for v in vs]
    combined = [a * v + b * u for v, u in zip(vs, us)]
    expected = a * merge("task_arithmetic", vs) + b * merge("task_arithmetic", us)
    torch.testing.assert_close(merge("task_arithmetic", combined), expected, atol=1e-3, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=20), st.floats(0.1, 3))
def test_one_task_at_density_one_returns_it_scaled(values, scale):
    v = torch.tensor(values)
    for method, params in [
        ("task_arithmetic", {"scale": scale}),
        ("ties", {"density": 1.0, "scale": scale}),
        ("dare_linear", {"density": 1.0, "scale": scale, "seed": 0}),
        ("dare_ties", {"density": 1.0, "scale": scale, "seed": 0}),
        ("consensus_ta", {"k": 1, "scale": scale}),
        ("metis", {"alphas": [1.0], "k": 1, "beta": scale}),
    ]:
        torch.testing.assert_close(merge(method, [v], **params), scale * v, atol=1e-4, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda t: st.lists(st.lists(finite, min_size=8, max_size=8), min_size=t, max_size=t)
    ),
    st.floats(-5, 5),
)
def test_metis_with_equal_gaps_is_consensus_ta_at_one_over_t(lists, gap):
    vs = _tensors(lists)
    count = len(vs)
    ours = merge("metis", vs, loss_gaps=[gap] * count, delta=0.3, k=2)
    # Equal gaps give alphas 1/T; strict and non-strict masks agree except on exact ties.
    weighted = [v / count for v in vs]
    total = sum(weighted)
    ties = any(bool(((w.abs() - 0.3 * (total - w).abs()).abs() < 1e-6).any()) for w in weighted)
    if not ties:
        torch.testing.assert_close(
            ours, merge("consensus_ta", vs, weights=[1 / count] * count, delta=0.3, k=2)
        )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_invariant_to_task_order(method):
    vs = vectors(4, size=2000, seed=7)
    gaps, weights, seeds = [0.3, -0.2, 1.1, 0.0], [1.0, 0.5, 2.0, 0.8], [10, 20, 30, 40]
    params = {
        "task_arithmetic": lambda o: {"weights": [weights[i] for i in o]},
        "ties": lambda o: {"weights": [weights[i] for i in o], "density": 0.3},
        "dare_linear": lambda o: {"weights": [weights[i] for i in o], "seed": [seeds[i] for i in o]},
        "dare_ties": lambda o: {"weights": [weights[i] for i in o], "seed": [seeds[i] for i in o]},
        "consensus_ta": lambda o: {"weights": [weights[i] for i in o]},
        "metis": lambda o: {"loss_gaps": [gaps[i] for i in o]},
    }[method]
    reference = merge(method, vs, **params([0, 1, 2, 3]))
    for order in itertools.islice(itertools.permutations(range(4)), 1, 24, 5):
        torch.testing.assert_close(
            merge(method, [vs[i] for i in order], **params(order)), reference, atol=1e-5, rtol=1e-6
        )


def test_dare_is_reproducible_from_its_seed_and_varies_with_it():
    vs = vectors()
    a, b = merge("dare_ties", vs, seed=1), merge("dare_ties", vs, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, merge("dare_ties", vs, seed=2))


def test_bfloat16_inputs_merge_in_float32_and_come_back_in_bfloat16():
    vs = [v.bfloat16() for v in vectors()]
    out = merge("ties", vs, density=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), merge("ties", [v.float() for v in vs], density=0.5).bfloat16().float()
    )


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda vs: merge("ties", []), "No task vectors"),
        (lambda vs: merge("ties", [vs[0], vs[1][:-1]]), r"Task vector 1 has shape \(4999,\)"),
        (
            lambda vs: merge("ties", [vs[0], torch.full_like(vs[1], float("nan"))]),
            "Task vector 1 has NaN or Inf",
        ),
        (lambda vs: merge("ties", [vs[0], vs[1].int()]), "floating point"),
        (lambda vs: merge("nope", vs), "Unknown merge method 'nope'"),
        (lambda vs: merge("ties", vs, lambda_=1), "no parameter 'lambda_'"),
        (lambda vs: merge("ties", vs, density=0.0), "density must be in"),
        (lambda vs: merge("dare_ties", vs, density=1.5), "density must be in"),
        (lambda vs: merge("consensus_ta", vs, delta=-0.1), "delta must be"),
        (lambda vs: merge("consensus_ta", vs, k=4), r"k must be an integer in \[1, 3\]"),
        (lambda vs: merge("metis", vs, loss_gaps=[1, 2, 3], temperature=0), "temperature must be"),
        (lambda vs: merge("metis", vs), "exactly one of loss_gaps"),
        (lambda vs: merge("metis", vs, loss_gaps=[1, 2]), "loss_gaps has 2 entries for 3"),
        (lambda vs: merge("task_arithmetic", vs, weights=[1, float("inf"), 1]), "weights must be finite"),
        (lambda vs: merge("dare_linear", vs, seed=[1, 2]), "seed has 2 entries"),
    ],
)
@pytest.mark.bad_input
def test_bad_input_names_the_culprit(call, message):
    with pytest.raises(ValueError, match=message):
        call(vectors())


def test_third_party_method_registers_with_one_decorator():
    @register_merge_method("test_elementwise_max")
    def elementwise_max(task_vectors, *, scale: float = 1.0):
        """Largest entry per coordinate."""
        return scale * torch.stack(task_vectors).max(0).values

    vs = vectors()
    assert "test_elementwise_max" in available_methods()
    torch.testing.assert_close(
        merge("test_elementwise_max", vs, scale=2.0), 2 * torch.maximum(torch.maximum(vs[0], vs[1]), vs[2])
    )
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("test_elementwise_max")(elementwise_max)


def test_our_methods_inside_mergekit_and_mergekit_methods_inside_ours():
    from mergekit.merge_methods import merge_tensors

    from metis_hf.merging.mergekit_bridge import register_with_mergekit

    ours = register_with_mergekit()
    assert register_with_mergekit() == ours  # idempotent
    # Ours that mergekit lacks; where mergekit has its own method of that name, its version stays.
    assert {"consensus_ta", "metis", "metis_robust"} <= set(ours)
    assert not {"task_arithmetic", "ties", "dare_ties", "dare_linear"} & set(ours)
    vs, base = vectors(3), vectors(1, seed=9)[0]
    inputs = [base, *[base + v for v in vs]]
    out = merge_tensors(inputs, "metis", parameters={"loss_gap": [0.1, 0.5, -0.2]}, base_index=0)
    torch.testing.assert_close(out - base, merge("metis", vs, loss_gaps=[0.1, 0.5, -0.2]), atol=1e-5, rtol=0)
    gaps, losses = [0.1, 0.5, -0.2], [2.0, 1.0, 4.0]
    out = merge_tensors(
        inputs, "metis_robust", parameters={"loss_gap": gaps, "reference_loss": losses}, base_index=0
    )
    expected = merge("metis_robust", vs, loss_gaps=gaps, reference_losses=losses)
    torch.testing.assert_close(out - base, expected, atol=1e-5, rtol=0)
    # relative gaps 0.05, 0.5, -0.05 at temperature 0.1, floor 0.5/3: by hand
    soft = torch.softmax(torch.tensor([0.05, 0.5, -0.05]) / 0.1, 0)
    alphas = (1 / 6 + 0.5 * soft).tolist()
    torch.testing.assert_close(expected, merge("metis_robust", vs, alphas=alphas), atol=1e-6, rtol=0)
    # standardized gaps (reference losses unused) at temperature 1: z-scores by hand
    raw = torch.tensor(gaps)
    soft = torch.softmax((raw - raw.mean()) / raw.std(unbiased=False), 0)
    out = merge_tensors(
        inputs,
        "metis_robust",
        parameters={"loss_gap": gaps, "reference_loss": losses, "gap_normalization": "standardized"},
        base_index=0,
    )
    expected = merge("metis_robust", vs, alphas=(1 / 6 + 0.5 * soft).tolist())
    torch.testing.assert_close(out - base, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="gap_normalization must be one of"):
        merge_tensors(
            inputs, "metis_robust", parameters={"loss_gap": gaps, "gap_normalization": "zscore"}, base_index=0
        )
    out = merge_tensors(inputs, "consensus_ta", parameters={"weight": [0.5, 1.0, 2.0], "k": 2}, base_index=0)
    torch.testing.assert_close(
        out - base, merge("consensus_ta", vs, weights=[0.5, 1.0, 2.0]), atol=1e-5, rtol=0
    )
    assert "mergekit:della" in available_methods(include_mergekit=True)
    torch.testing.assert_close(
        merge("mergekit:ties", vs, density=0.3), merge("ties", vs, density=0.3), atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="Unknown mergekit method"):
        merge("mergekit:nope", vs)


# --- metis_robust: the failure modes of the paper's formula, pinned -----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metis_hf.merging.robust import robust_weights  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(2, 16),
    raw=st.lists(st.floats(0.01, 1.0), min_size=16, max_size=16),
    seed=st.integers(0, 1000),
)
def test_identical_task_vectors_survive_the_robust_mask_for_any_count_and_weights(count, raw, seed):
    torch.manual_seed(seed)
    vector = torch.randn(257)
    alphas = [r / sum(raw[:count]) for r in raw[:count]]
    merged = merge("metis_robust", [vector.clone() for _ in range(count)], alphas=alphas)
    torch.testing.assert_close(merged, vector)  # a convex combination of v with itself, all kept


def test_the_paper_mask_zeroes_identical_vectors_from_five_tasks():
    """Why metis_robust exists: with T >= 5 uniform weights alpha = 1/T < delta / (1 + delta)."""
    vector = torch.randn(64)
    for count in (4, 5, 8):
        merged = merge("metis", [vector] * count, alphas=[1 / count] * count)
        # |v/T| > 0.3 |v (T-1)/T|  <=>  1 > 0.3 (T-1)  <=>  T < 4.33
        expected = vector if count == 4 else torch.zeros_like(vector)
        torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("count", [4, 5, 8])
def test_the_tall_mask_zeroes_what_five_or_more_tasks_share(count):
    """ConsensusTA's TALL mask has the same threshold on a shared coordinate: |v| >= delta (T - 1) |v|
    holds for T <= 1 + 1 / delta (4.33 at delta 0.3). Many-shot LoRA factors share their start
    (every task's A begins at the same G_0), so at T = 8 the merged A loses what the tasks share."""
    vector = torch.randn(64)
    merged = merge("consensus_ta", [vector] * count, scale=1 / count)
    torch.testing.assert_close(merged, vector if count == 4 else torch.zeros_like(vector))
    # below 1 / (T - 1) the shared coordinates stay: 0.1 * 7 = 0.7 <= 1
    torch.testing.assert_close(merge("consensus_ta", [vector] * count, delta=0.1, scale=1 / count), vector)


def test_robust_weights_are_relative_floored_and_sum_to_one():
    gaps, losses = [0.2, 1.0, 0.1], [2.0, 10.0, 1.0]  # equal relative gaps (0.1 each)
    torch.testing.assert_close(
        torch.tensor(robust_weights(gaps, losses, 0.1)), torch.full((3,), 1 / 3), check_dtype=False
    )
    # scale-free: multiplying every loss and gap by 7 changes nothing
    assert robust_weights([0.7, 0.1], [2.0, 3.0], 0.1) == pytest.approx(
        robust_weights([4.9, 0.7], [14.0, 21.0], 0.1)
    )
    # one huge gap: softmax -> (1, 0), floored at 0.5 / T = 0.25 each -> (0.75, 0.25)
    assert robust_weights([50.0, 0.0], None, 0.1) == pytest.approx([0.75, 0.25])
    by_hand = [math.exp(0.5 / 0.2), 1.0]
    soft = [b / sum(by_hand) for b in by_hand]
    assert robust_weights([0.5, 0.0], None, 0.2, floor=0.1) == pytest.approx([0.1 + 0.8 * s for s in soft])
    with pytest.raises(ValueError, match="floor must lie in"):
        robust_weights([0.1, 0.2], None, 0.1, floor=0.6)


def test_standardized_gaps_by_hand():
    # gaps 1, 2, 3: mean 2, population sd sqrt(2/3), so z = -1.2247, 0, +1.2247; temperature 1
    z = [-math.sqrt(1.5), 0.0, math.sqrt(1.5)]
    total = sum(math.exp(v) for v in z)
    soft = [math.exp(v) / total for v in z]
    floor = 0.5 / 3
    expected = [floor + 0.5 * s for s in soft]
    assert robust_weights([1.0, 2.0, 3.0], None, gap_normalization="standardized") == pytest.approx(expected)
    # invariant to any common scale and shift of the gaps; the reference losses play no part
    assert robust_weights(
        [13.0, 23.0, 33.0], [5.0, 1.0, 9.0], gap_normalization="standardized"
    ) == pytest.approx(expected)
    # equal gaps: uniform, not a division by zero
    assert robust_weights([0.4] * 4, None, gap_normalization="standardized") == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="gap_normalization must be one of"):
        robust_weights([0.1, 0.2], None, gap_normalization="zscore")


def test_erased_shares_by_hand():
    # base, local (each task's adapter) and merged losses of four tasks
    base, local, merged = [2.0, 3.0, 1.5, 1.0], [1.0, 1.0, 1.0, 1.2], [1.5, 1.5, 2.0, 1.1]
    gaps = [m - loc for m, loc in zip(merged, local)]  # 0.5, 0.5, 1.0, -0.1
    # lost / achievable: 0.5 / 1 = 0.5; 0.5 / 2 = 0.25; 1.0 / 0.5 = 2 -> clipped to 1 (the merge is
    # worse than the base); the fourth adapter is worse than the base: nothing to lose, 0
    shares = [0.5, 0.25, 1.0, 0.0]
    total = sum(math.exp(v / 0.1) for v in shares)
    expected = [0.5 / 4 + 0.5 * math.exp(v / 0.1) / total for v in shares]
    weights = robust_weights(gaps, merged, gap_normalization="erased", base_losses=base)
    assert weights == pytest.approx(expected)
    # scale-free: every loss times 7 gives the same weights
    scaled = robust_weights(
        [7 * g for g in gaps],
        [7 * m for m in merged],
        gap_normalization="erased",
        base_losses=[7 * b for b in base],
    )
    assert scaled == pytest.approx(expected)
    vs = [torch.randn(64, generator=torch.Generator().manual_seed(t)) for t in range(4)]
    torch.testing.assert_close(
        merge(
            "metis_robust",
            vs,
            loss_gaps=gaps,
            reference_losses=merged,
            base_losses=base,
            gap_normalization="erased",
        ),
        merge("metis_robust", vs, alphas=expected),
    )
    with pytest.raises(ValueError, match="needs reference_losses .* and base_losses"):
        robust_weights(gaps, merged, gap_normalization="erased")


def test_robust_mask_by_hand():
    # coordinate 0: all agree; 1: only task a is nonzero (selfish); 2: a and b agree, c opposes
    a, b, c = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, -1.0])
    alphas = [0.5, 0.3, 0.2]
    merged_by_hand = [1.0, 0.0, 0.5 + 0.3 - 0.2]
    # coord 1: V = 1.0; a: 2 >= 0.3*|1-2| yes; b: 0 >= 0.3*1 no; c: no -> 1 owner < k=2 -> 0
    # coord 2: V = 0.6; a: 1 >= 0.12 yes; b: yes; c: 1 >= 0.3*1.6 = 0.48 yes -> kept
    out = merge("metis_robust", [a, b, c], alphas=alphas)
    torch.testing.assert_close(out, torch.tensor(merged_by_hand))


def test_merged_norm_stays_bounded_over_rounds():
    """Many-shot in LoRA space: each round every task adds its own update to the merge. The
    robust merge is a masked convex combination, so it never grows beyond the task vectors."""
    torch.manual_seed(0)
    count, size = 6, 4096
    directions = [torch.randn(size) * 0.1 for _ in range(count)]
    merged = torch.zeros(size)
    for _ in range(30):
        tasks = [merged + d for d in directions]
        gaps = torch.rand(count).tolist()
        merged = merge("metis_robust", tasks, loss_gaps=gaps, reference_losses=[2.0] * count)
        assert merged.norm() <= max(t.norm() for t in tasks) + 1e-4
    assert merged.norm() < 30 * min(d.norm() for d in directions)  # no blow-up across 30 rounds


# --- fused CPU loops (numba) against the eager chunked kernels ---------------------------------


FUSED_CASES = {
    "task_arithmetic": {"weights": [0.3, -1.0, 2.0, 0.25, 1.5]},
    "ties": {"weights": [1.0, 0.5, 2.0, 0.8, 1.2], "density": 0.3},
    "dare_linear": {"weights": [1.0, 0.5, 2.0, 0.8, 1.2], "density": 0.4, "seed": 3},
    "dare_ties": {"weights": [1.0, 0.5, 2.0, 0.8, 1.2], "density": 0.4, "seed": 3},
    "consensus_ta": {"weights": [0.2, 0.2, 0.2, 0.2, 0.2], "delta": 0.5, "k": 2},
    "metis": {"loss_gaps": [0.3, -0.2, 1.1, 0.0, 0.7]},
    "metis_robust": {"loss_gaps": [0.3, -0.2, 1.1, 0.0, 0.7], "gap_normalization": "standardized"},
}
# Weights, densities and deltas that are powers of two or short binary fractions: on inputs on a
# grid of halves every product and partial sum is exact, so any summation order (task order, a
# pairwise sum, any BLAS's matrix product) gives the same bits, and exact ties stay exact ties.
DYADIC_WEIGHTS = [1.0, 0.5, 2.0, 0.75, 1.25]
DYADIC_ALPHAS = [0.125, 0.25, 0.125, 0.25, 0.25]
EXACT_FUSED_CASES = {
    "task_arithmetic": {"weights": [0.25, -1.0, 2.0, 0.5, 1.5]},
    "ties": {"weights": DYADIC_WEIGHTS, "density": 0.3},
    "dare_linear": {"weights": DYADIC_WEIGHTS, "density": 0.5, "seed": 3},
    "dare_ties": {"weights": DYADIC_WEIGHTS, "density": 0.5, "seed": 3},
    "consensus_ta": {"weights": [0.25] * 5, "delta": 0.5, "k": 2},
    "metis": {"alphas": DYADIC_ALPHAS, "delta": 0.5},
    "metis_robust": {"alphas": DYADIC_ALPHAS, "delta": 0.5},
}
# Five tasks over two chunks and a ragged tail. (A tail of one element would not do: torch sums a
# [T, 1] slice in another order than a [T, c] one.)
FUSED_SIZE = 2 * (1 << 18) + 4099


def _grid_vectors(dtype: torch.dtype, off_grid: bool) -> list[torch.Tensor]:
    """Values on a grid of halves in [-3, 3], so that magnitude ties at TIES's threshold, zero sums
    in the election and mask ties are all common; ``off_grid`` adds noise to one task."""
    g = torch.Generator().manual_seed(5)
    vs = [(torch.randint(-6, 7, (FUSED_SIZE,), generator=g) / 2).to(dtype) for _ in range(5)]
    if off_grid:
        vs[1] = vs[1] + torch.randn(FUSED_SIZE, generator=g, dtype=dtype)
    return vs


def _fused_and_eager(method, vs, params, threads, monkeypatch):
    from metis_hf.merging import fused

    assert fused.numba is not None, "numba is a dependency: the fused loops must be tested"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the fused loops take torch's thread count, BLAS too
    try:
        assert fused.fusable(vs)
        ours = merge(method, vs, **params)
        monkeypatch.setenv("METIS_HF_FUSED", "0")
        assert not fused.fusable(vs)
        eager = merge(method, vs, **params)
    finally:
        torch.set_num_threads(before)
        monkeypatch.delenv("METIS_HF_FUSED", raising=False)
    assert ours.dtype == eager.dtype == vs[0].dtype
    return ours, eager


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", sorted(EXACT_FUSED_CASES))
def test_fused_loops_equal_the_eager_kernels_bit_for_bit_where_order_cannot_matter(
    method, threads, monkeypatch
):
    vs = _grid_vectors(torch.float32, off_grid=False)
    ours, eager = _fused_and_eager(method, vs, EXACT_FUSED_CASES[method], threads, monkeypatch)
    assert torch.equal(ours, eager)
    assert 0 < (ours != 0).double().mean() < 1  # not vacuous: some coordinates kept, some not


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", sorted(FUSED_CASES))
def test_fused_loops_equal_the_eager_kernels(method, dtype, threads, monkeypatch):
    vs = _grid_vectors(dtype, off_grid=True)
    params = FUSED_CASES[method]
    ours, eager = _fused_and_eager(method, vs, params, threads, monkeypatch)
    if method not in ("task_arithmetic", "dare_linear"):
        # The same coordinates are kept: thresholds, sign elections and masks compare values or
        # sums that both paths form in the same order. (A plain weighted sum has no such choice:
        # its zeros are exact cancellations, which depend on the order.)
        assert torch.equal(ours == 0, eager == 0)
    # The values agree up to the order of the weighted sum (the fused loop adds in task order; the
    # eager TIES and DARE use a matrix product, whose order depends on the host's BLAS): bounded by
    # the forward error of recursive summation, (T - 1) eps sum_t |w_t v_t|, with w_t <= 2.5.
    magnitudes = torch.stack([v.abs() for v in vs]).sum(0) * 2.5 / min(params.get("density", 1.0), 1.0)
    bound = (len(vs) - 1) * torch.finfo(dtype).eps * magnitudes
    assert bool(((ours - eager).abs() <= bound).all()), float(((ours - eager).abs() - bound).max())


def test_fused_loops_leave_other_dtypes_and_layouts_to_the_eager_kernels():
    from metis_hf.merging import fused

    vs = vectors(3, size=64)
    assert fused.fusable(vs)
    assert not fused.fusable([v.bfloat16() for v in vs])
    assert not fused.fusable([v.reshape(8, 8).T for v in vs])  # not contiguous
    assert not fused.fusable([vs[0], vs[1].double(), vs[2]])


def test_fused_loops_work_without_a_writable_cache_directory():
    """A read-only install with a read-only home: numba finds no cache directory and refuses
    cache=True; the loops must then compile uncached rather than break every import."""
    import subprocess
    import sys

    # Only the zip-archive locator: it applies to no file here, as no locator would on a read-only system.
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "ZipCacheLocator", "METIS_HF_FUSED": "1"}
    code = (
        "import torch; from metis_hf.merging import fused, merge; "
        "assert fused.fusable([torch.ones(3)]); "
        "print(merge('task_arithmetic', [torch.ones(3), 2 * torch.ones(3)], weights=[1.0, 0.5]).tolist())"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[2.0, 2.0, 2.0]"
