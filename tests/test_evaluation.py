"""Combined scores (evaluate metric modules), the compare report, `metis-hf eval` and the harness."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

from metis_hf.commands import main
from metis_hf.evaluation.combine import load_metric, metric_path, summarize
from metis_hf.evaluation.report import build_report, write_report
from metis_hf.hub import card_info_for, write_card
from metis_hf.recipe import CompareSpec
from tests.conftest import make_tiny_model


def test_normalized_score_average_worst_and_gap_by_hand():
    out = summarize({"a": 0.3, "b": 0.5, "c": 0.2}, {"a": 0.6, "b": 0.5, "c": 0.4})
    assert out["normalized"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5})
    assert out["average"] == pytest.approx(2 / 3)
    assert out["worst"] == pytest.approx(0.5) and out["worst_task"] == "a"
    assert out["gap"] == pytest.approx(0.5 - 2 / 3)


def test_paper_average_counts_multilingual_three_times():
    scores = {"instruction": 0.9, "math": 0.8, "multilingual": 1.0, "safety": 1.2}
    out = summarize(scores, weights={"multilingual": 3.0})
    assert out["average"] == pytest.approx((0.9 + 0.8 + 3 * 1.0 + 1.2) / 6)
    assert out["worst"] == pytest.approx(0.8)


def test_an_expert_at_zero_leaves_its_task_undefined():
    out = summarize({"a": 0.2, "b": 0.1}, {"a": 0.4, "b": 0.0})
    assert math.isnan(out["normalized"]["b"]) and out["undefined_tasks"] == 1
    assert out["average"] == pytest.approx(0.5) and out["worst"] == pytest.approx(0.5)


def test_metric_modules_load_from_the_package_not_the_hub():
    import metis_hf

    path = metric_path("normalized_score")
    assert str(path).startswith(str(metis_hf.__path__[0]))
    metric = load_metric("normalized_score")  # HF_HUB_OFFLINE=1 here: a Hub load would fail
    assert metric.compute(predictions=[1.0, 3.0], references=[2.0, 4.0])["normalized_scores"] == [0.5, 0.75]
    with pytest.raises(ValueError, match="Unknown metric 'accuracy'"):
        metric_path("accuracy")
    with pytest.raises(ValueError, match="2 weights for 3 scores"):
        load_metric("multitask_summary").compute(predictions=[1.0, 2.0, 3.0], weights=[1, 1])


def _run(kind, seed, method, exact, loss=1.0, rounds=None):
    scores = {t: {"task": t, "score": e, "exact_match": e, "n": 10, "loss": loss} for t, e in exact.items()}
    losses = {t: loss for t in exact}
    return {
        "kind": kind,
        "seed": seed,
        "method": method,
        "scores": scores,
        "losses": losses,
        "rounds": rounds,
    }


def test_report_normalizes_by_the_same_seeds_experts_and_pairs_by_seed(tmp_path):
    tasks = ["t1", "t2", "t3"]

    def rounds_of(seed):  # seed 1 masks more and weighs t1 up
        return [
            {
                "round": r,
                "merge/multitask_loss": 2.0 / r + seed,
                "merge/mask_density": 0.9 - 0.2 * seed * r,
                **{
                    f"merge/alpha/{t}": (0.5 if seed and t == "t1" else 0.25 if seed else 1 / 3)
                    for t in tasks
                },
            }
            for r in (1, 2)
        ]

    runs = [_run("base", None, None, dict(t1=0.0, t2=0.0, t3=0.0))]
    for seed, expert in ((0, 0.5), (1, 0.4)):
        runs.append(_run("experts", seed, None, dict(t1=expert, t2=expert, t3=0.5)))
        runs.append(_run("post_hoc", seed, "task_arithmetic", dict(t1=0.1, t2=0.2, t3=0.25)))
        runs.append(_run("post_hoc", seed, "metis", dict(t1=0.2, t2=0.2, t3=0.25)))
        runs.append(_run("many_shot", seed, "metis", dict(t1=0.4, t2=0.3, t3=0.5), rounds=rounds_of(seed)))
    report = build_report(runs, tasks, CompareSpec(seeds=[0, 1]))
    # seed 0, post-hoc TA: 0.1/0.5, 0.2/0.5, 0.25/0.5; seed 1: 0.1/0.4, 0.2/0.4, 0.25/0.5
    ta0, ta1 = [0.2, 0.4, 0.5], [0.25, 0.5, 0.5]
    agg = report["aggregate"]["post_hoc/task_arithmetic"]
    assert agg["normalized"]["t1"]["mean"] == pytest.approx(0.225)
    assert agg["average"]["mean"] == pytest.approx((statistics.fmean(ta0) + statistics.fmean(ta1)) / 2)
    assert agg["average"]["sd"] == pytest.approx(
        statistics.stdev([statistics.fmean(ta0), statistics.fmean(ta1)])
    )
    assert agg["worst"]["mean"] == pytest.approx((0.2 + 0.25) / 2)
    ms0, ms1 = [0.8, 0.6, 1.0], [1.0, 0.75, 1.0]
    pairs = {(" ".join(c["a"]), " ".join(c["b"])): c for c in report["paired_differences"]}
    assert len(pairs) == len(report["paired_differences"])  # no pair twice
    vs_ta = pairs[("many_shot metis", "post_hoc task_arithmetic")]
    assert vs_ta["average"]["per_seed"] == pytest.approx(
        [statistics.fmean(ms0) - statistics.fmean(ta0), statistics.fmean(ms1) - statistics.fmean(ta1)]
    )
    assert (
        vs_ta["worst"]["per_seed"] == pytest.approx([0.6 - 0.2, 0.75 - 0.25]) and vs_ta["worst"]["wins"] == 2
    )
    assert ("many_shot metis", "post_hoc metis") in pairs
    md = report["markdown"]
    assert "| **Post-hoc** |" in md and "| **Many-shot** |" in md
    assert f"| metis | {0.9:.3f} ± {statistics.stdev([0.8, 1.0]):.3f} |" in md
    round_2 = report["rounds"]["many_shot/metis"][1]  # seeds 0 and 1: density 0.9 and 0.5, loss 1 and 2
    assert round_2["round"] == 2 and round_2["mask_density"]["mean"] == pytest.approx(0.7)
    assert round_2["mask_density"]["sd"] == pytest.approx(statistics.stdev([0.9, 0.5]))
    assert round_2["multitask_loss"]["mean"] == pytest.approx(1.5)
    assert (round_2["alpha_min"], round_2["alpha_max"]) == pytest.approx((0.25, 0.5))
    assert f"| metis | 2 | 0.700 ± {statistics.stdev([0.9, 0.5]):.3f} | 1.500 ± " in md
    written = write_report(report, tmp_path)
    names = {p.name for p in written}
    assert {
        "results.json",
        "results.md",
        "radar_post_hoc.png",
        "radar_many_shot.png",
        "round_curves.png",
    } <= names
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "round_curves.png").shape[0] > 100
    assert json.loads((tmp_path / "results.json").read_text())["metric"] == "exact_match"


# --- metis-hf eval ---------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny"
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _reference_loss(model, tokenizer, rows) -> float:
    """Mean over examples of the mean next-token cross-entropy over all tokens (+ EOS)."""
    losses = []
    for row in rows:
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        losses.append(float(F.cross_entropy(logits, ids[0, 1:])))
    return sum(losses) / len(losses)


def _reference_answer_loss(model, tokenizer, rows) -> float:
    """Mean over examples of the cross-entropy of the completion's tokens and EOS given all
    that precedes them."""
    losses = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        losses.append(float(F.cross_entropy(logits, torch.tensor(answer))))
    return sum(losses) / len(losses)


def test_eval_scores_losses_and_normalizes(tmp_path, model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from metis_hf.data import TaskSpec, build_task

    # A random tiny model answers nothing right, and 0 / 0.5 = 0 would pass any normalization: the
    # answers are the right ones for the first 3 of 4 chain_sum items and the first 1 of 4 gcd items.
    right = {}
    for name, count in (("chain_sum", 3), ("gcd", 1)):
        test = build_task(TaskSpec(name=name, validation_size=3, test_size=4)).test
        right.update({row["prompt"]: row["answer"] if i < count else "wrong" for i, row in enumerate(test)})
    monkeypatch.setattr(
        "metis_hf.evaluation.generation.generate_answers",
        lambda model, tokenizer, prompts, *args, **kwargs: [right[p] for p in prompts],
    )
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"chain_sum": 0.5, "gcd": {"score": 0.25, "exact_match": 0.5}}))
    out = tmp_path / "eval.json"
    write_card(model_dir, card_info_for("model", "ties", "merge", None))
    args = ["eval", str(model_dir), "--tasks", "chain_sum,gcd", "--test-size", "4", "--validation-size", "3"]
    assert (
        main([*args, "--max-new-tokens", "3", "--experts", str(experts), "--output", str(out), "--card"]) == 0
    )
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"chain_sum", "gcd"} and result["tasks"]["gcd"]["n"] == 4
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    validation = build_task(TaskSpec(name="gcd", validation_size=3, test_size=4)).validation
    assert result["tasks"]["gcd"]["loss"] == pytest.approx(
        _reference_loss(model, tiny_tokenizer, validation), rel=1e-4
    )
    assert result["tasks"]["gcd"]["answer_loss"] == pytest.approx(
        _reference_answer_loss(model, tiny_tokenizer, validation), rel=1e-4
    )
    assert result["tasks"]["gcd"]["item_exact_matches"] == [1.0, 0.0, 0.0, 0.0]
    exact = {t: result["tasks"][t]["exact_match"] for t in ("chain_sum", "gcd")}
    assert exact == {"chain_sum": 0.75, "gcd": 0.25}
    # by hand: exact match over the experts' (chain_sum's bare number is its exact match too)
    assert result["summary"]["normalized"] == pytest.approx({"chain_sum": 0.75 / 0.5, "gcd": 0.25 / 0.5})
    # --card: the same numbers in the folder's card, read back through huggingface_hub
    card = ModelCard.load(model_dir / "README.md")
    found = {tuple(r.metric_name.split()): r for r in card.data.eval_results}
    expected = {
        ("chain_sum", "exact_match"): 0.75,
        ("gcd", "exact_match"): 0.25,
        ("Avg", "exact_match"): 0.5,
        ("Worst", "exact_match"): 0.25,
        ("chain_sum", "normalized_exact_match"): 1.5,
        ("gcd", "normalized_exact_match"): 0.5,
        ("Avg", "normalized_exact_match"): 1.0,
        ("Worst", "normalized_exact_match"): 0.5,
    }
    assert {key: r.metric_value for key, r in found.items()} == pytest.approx(expected)
    gcd = found[("gcd", "exact_match")]
    assert (gcd.dataset_type, gcd.dataset_config, gcd.dataset_split) == ("reasoning-gym", "gcd", "test")
    assert (
        gcd.dataset_args == {"generator": "gcd", "seed": 20_000, "size": 4} and gcd.source_name == "metis-hf"
    )
    assert "| Worst | all tasks: chain_sum, gcd | normalized_exact_match | 0.5000 |" in card.text


def test_eval_loads_an_adapter_on_its_recorded_base(tmp_path, model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from metis_hf.evaluation.suite import load_for_evaluation

    base = make_tiny_model(len(tiny_tokenizer))
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, tokenizer = load_for_evaluation(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    assert len(tokenizer) == len(tiny_tokenizer)


@pytest.mark.bad_input
def test_eval_bad_input_is_named(tmp_path, model_dir, tiny_tokenizer, capsys):
    small = tmp_path / "small"
    make_tiny_model(64).save_pretrained(small)
    assert main(["eval", str(small), "--tokenizer", str(model_dir), "--tasks", "gcd"]) == 2
    assert "do not belong to the same model" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--tasks", "no_such_task", "--test-size", "2"]) == 2
    assert "'no_such_task'" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--tasks", "gcd", "--metric", "accuracy"]) == 2
    assert "Unknown metric 'accuracy'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "gcd"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--tasks", "gcd", "--card"]) == 2
    assert f"--card: {model_dir} is not a folder that metis-hf wrote" in capsys.readouterr().err


@pytest.mark.bad_input
def test_an_empty_evaluation_set_is_refused(model_dir, tiny_tokenizer):
    from datasets import Dataset

    from metis_hf.data import Task
    from metis_hf.evaluation.suite import evaluate_model

    rows = [{"prompt": "Q\nAnswer:", "completion": " 1\n\n", "answer": "1", "entry": "{}"}]
    empty = Dataset.from_list(rows).select([])
    task = Task("lonely", Dataset.from_list(rows), Dataset.from_list(rows), empty)
    with pytest.raises(ValueError, match="'lonely': split 'test' is empty"):
        evaluate_model(make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer, {"lonely": task})


# --- lm-evaluation-harness -------------------------------------------------------------------


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole))))


def _harness_task(tmp_path):
    docs = [
        {"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a * b + 1), "7"], "label": i % 3}
        for i, (a, b) in enumerate([(1, 2), (2, 3), (3, 4), (4, 5), (0, 9), (6, 1)])
    ]
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks_dir = tmp_path / "harness_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_qa.yaml").write_text(
        "task: metis_tiny_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return docs, tasks_dir


def test_harness_runs_a_custom_task_over_local_jsonl(tmp_path, tiny_tokenizer):
    from metis_hf.evaluation.harness import run_harness

    docs, tasks_dir = _harness_task(tmp_path)
    model = make_tiny_model(len(tiny_tokenizer), seed=3)
    results = run_harness(model, tiny_tokenizer, ["metis_tiny_qa"], include_path=str(tasks_dir), batch_size=2)
    expected = statistics.fmean(
        float(
            max(
                range(3),
                key=lambda c: _choice_logprob(
                    model, tiny_tokenizer, f"{d['question']}\nAnswer:", " " + d["choices"][c]
                ),
            )
            == d["label"]
        )
        for d in docs
    )
    assert results["metis_tiny_qa"]["acc,none"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="Unknown lm-evaluation-harness task 'no_such_task'"):
        run_harness(model, tiny_tokenizer, ["no_such_task"], include_path=str(tasks_dir))


def test_no_defined_score_gives_nan_not_an_error():
    out = summarize({"a": 0.0, "b": 0.1}, {"a": 0.0, "b": 0.0})
    assert math.isnan(out["average"]) and out["undefined_tasks"] == 2 and out["worst_task"] is None


def test_compare_scores_harness_columns_and_gives_experts_only_theirs(tmp_path, tiny_tokenizer):
    from metis_hf.evaluation.harness import run_harness
    from metis_hf.recipe import load_recipe
    from metis_hf.workflows.compare import Comparison
    from tests.conftest import write_tiny_recipe

    _, tasks_dir = _harness_task(tmp_path)
    evaluation = {
        "generation": False,
        "harness_include": str(tasks_dir),
        "harness_batch_size": 2,
        "harness": [{"name": "QA", "tasks": ["metis_tiny_qa"], "metric": "acc,none", "expert": "gcd"}],
    }
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_tokenizer, evaluation=evaluation))
    comparison = Comparison(recipe, tmp_path / "cmp")
    assert comparison.scorer.score_names == ["QA"]
    model = make_tiny_model(len(tiny_tokenizer), seed=3)
    result = comparison.scorer.evaluate(model, tiny_tokenizer)
    expected = run_harness(
        model, tiny_tokenizer, ["metis_tiny_qa"], include_path=str(tasks_dir), batch_size=2
    )
    assert result["scores"]["QA"]["score"] == pytest.approx(expected["metis_tiny_qa"]["acc,none"])
    assert set(result["losses"]) == {"chain_sum", "gcd"} and all(v > 0 for v in result["losses"].values())
    assert comparison.scorer.evaluate(model, tiny_tokenizer, ["chain_sum"])["scores"] == {}  # not its expert


# --- uncertainty -----------------------------------------------------------------------------


def _itemized(kind, seed, method, items):
    """A run whose per-item exact matches are ``items`` (task -> 0/1 list)."""
    run = _run(kind, seed, method, {t: sum(v) / len(v) for t, v in items.items()})
    for task, values in items.items():
        run["scores"][task].update(n=len(values), item_exact_matches=list(map(float, values)))
    return run


def test_sign_flip_p_by_hand():
    from metis_hf.evaluation.uncertainty import sign_flip_p

    assert sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # only +++ and --- reach |0.6|
    # sums of +-0.3 +-0.1 +-0.1: 0.3 0.1 0.5 0.3 -0.3 -0.5 -0.1 -0.3; six reach |0.3|
    assert sign_flip_p([0.3, -0.1, 0.1]) == pytest.approx(6 / 8)
    assert sign_flip_p([0.0, 0.0]) == 1.0 and math.isnan(sign_flip_p([]))


def test_item_intervals_are_paired_across_runs_and_match_the_binomial_spread():
    """One task of 100 items, an expert right on all of them (so normalized = the merged score).
    A merge right on half the items: its interval is the binomial one, 0.5 +- 1.96 * 0.05. B is A
    plus one item: the paired difference stays within a few items and is a tie. C is right on 20
    items more than D, D's right items a subset of C's: C wins, the difference's sd is
    sqrt(0.2 * 0.8 / 100) = 0.04; an unpaired bootstrap would spread it over +-0.14."""
    n = 100
    half = [1] * 50 + [0] * 50
    runs = [_itemized("experts", 0, None, {"t": [1] * n})]
    runs.append(_itemized("post_hoc", 0, "a", {"t": half}))
    runs.append(_itemized("post_hoc", 0, "b", {"t": [1] * 51 + [0] * 49}))
    runs.append(_itemized("many_shot", 0, "c", {"t": [1] * 60 + [0] * 40}))
    runs.append(_itemized("many_shot", 0, "d", {"t": [1] * 40 + [0] * 60}))
    report = build_report(runs, ["t"], CompareSpec(seeds=[0]))
    low, high = report["aggregate"]["post_hoc/a"]["interval"]["average"]
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(
        0.5 + 1.96 * 0.05, abs=0.02
    )
    assert report["aggregate"]["post_hoc/a"]["interval"]["normalized"]["t"] == [low, high]

    from metis_hf.evaluation.uncertainty import bootstrap_replicates, interval, verdict

    by_run = bootstrap_replicates(runs[1:], {0: runs[0]}, ["t"], "exact_match")
    b_minus_a = interval(by_run[("post_hoc", "b", 0)]["average"] - by_run[("post_hoc", "a", 0)]["average"])
    assert 0.0 <= b_minus_a[0] and b_minus_a[1] <= 0.04 and verdict(*b_minus_a) == "tie"
    c_minus_d = interval(by_run[("many_shot", "c", 0)]["average"] - by_run[("many_shot", "d", 0)]["average"])
    assert c_minus_d == pytest.approx([0.2 - 1.96 * 0.04, 0.2 + 1.96 * 0.04], abs=0.02)
    assert verdict(*c_minus_d) == "A"


def test_report_intervals_average_the_seeds_and_mark_ties(tmp_path):
    """Two tasks, two seeds. Normalization uses each seed's own expert per replicate; Avg's
    interval is around the seed mean of Avg; a pair inside its interval is printed as a tie; a run
    without per-item values (an older result file) leaves the report without intervals."""
    n = 50
    right = lambda k: [1] * k + [0] * (n - k)  # noqa: E731
    runs = []
    for seed, expert_right in ((0, 40), (1, 25)):
        runs.append(_itemized("experts", seed, None, {"t1": right(expert_right), "t2": right(50)}))
        runs.append(_itemized("many_shot", seed, "metis", {"t1": right(20), "t2": right(45)}))
        runs.append(_itemized("many_shot", seed, "consensus_ta", {"t1": right(20), "t2": right(44)}))
    report = build_report(runs, ["t1", "t2"], CompareSpec(seeds=[0, 1]))
    metis = report["aggregate"]["many_shot/metis"]
    # Avg per seed: (20/40 + 45/50) / 2 = 0.7 and (20/25 + 0.9) / 2 = 0.85
    assert metis["average"]["mean"] == pytest.approx(0.775)
    low, high = metis["interval"]["average"]
    assert low < 0.775 < high and high - low < 0.4
    t1_low, t1_high = metis["interval"]["normalized"]["t1"]
    assert t1_low < (0.5 + 0.8) / 2 < t1_high
    pair = next(c for c in report["paired_differences"] if c["b"] == ["many_shot", "consensus_ta"])
    assert pair["average"]["verdict"] == "tie" and pair["average"]["p_sign_flip"] == pytest.approx(0.5)
    assert (
        "| tie, tie |" in report["markdown"]
        and f"0.775 ± {statistics.stdev([0.7, 0.85]):.3f} [" in report["markdown"]
    )
    del runs[-1]["scores"]["t2"]["item_exact_matches"]
    older = build_report(runs, ["t1", "t2"], CompareSpec(seeds=[0, 1]))
    assert "interval" not in older["aggregate"]["many_shot/metis"]
    assert "verdict" not in older["paired_differences"][0]["average"]


def test_gain_kept_on_answer_losses_by_hand_and_where_it_disagrees_with_exact_match():
    """Base answer losses 4, 3, 2; the expert's 2, 1, 2.5 (no gain on t3: undefined there).
    metis at 3 and 1.5 keeps 0.5 and 0.75 of the gains (Avg 0.625, Worst 0.5); task_arithmetic at
    2.5 and 1 keeps 0.75 and 1 (Avg 0.875) but scores lower exact match: the two metrics disagree."""
    tasks = ["t1", "t2", "t3"]

    def with_losses(run, answer):
        return {**run, "answer_losses": dict(zip(tasks, answer))}

    runs = [
        with_losses(_run("base", None, None, dict(t1=0.0, t2=0.0, t3=0.0)), [4.0, 3.0, 2.0]),
        with_losses(_run("experts", 0, None, dict(t1=0.5, t2=0.5, t3=0.5)), [2.0, 1.0, 2.5]),
        with_losses(_run("many_shot", 0, "metis", dict(t1=0.4, t2=0.4, t3=0.4)), [3.0, 1.5, 2.2]),
        with_losses(_run("many_shot", 0, "task_arithmetic", dict(t1=0.3, t2=0.3, t3=0.3)), [2.5, 1.0, 2.2]),
    ]
    report = build_report(runs, tasks, CompareSpec(seeds=[0]))
    kept = report["summaries"]["many_shot/metis"]["0"]["gain_kept"]
    assert kept["kept"]["t1"] == pytest.approx(0.5) and kept["kept"]["t2"] == pytest.approx(0.75)
    assert math.isnan(kept["kept"]["t3"])
    assert kept["average"] == pytest.approx(0.625) and kept["worst"] == pytest.approx(0.5)
    pair = report["paired_differences"][0]
    assert pair["a"] == ["many_shot", "metis"] and pair["gain_kept_average"]["mean"] == pytest.approx(-0.25)
    md = report["markdown"]
    assert "| metis | 0.500 | 0.750 | n/a | 0.625 | 0.500 |" in md
    assert (
        "disagree in sign on Avg (exact / gain kept) for: many_shot metis - many_shot task_arithmetic" in md
    )
    older = build_report(
        [{k: v for k, v in r.items() if k != "answer_losses"} for r in runs], tasks, CompareSpec()
    )
    assert "gain kept, on answer-token" not in older["markdown"]


def test_a_variant_of_a_loss_gap_method_is_paired_with_every_run_like_the_method():
    """A METIS setting tried as a variant (metis_robust@erased) is what a user wants weighed against
    the baselines: it is paired with them as metis_robust is; a variant of task arithmetic is not."""
    tasks = ["t1", "t2"]
    runs = [_run("experts", 0, None, dict(t1=0.5, t2=0.4))]
    for method, exact in (
        ("consensus_ta", dict(t1=0.2, t2=0.3)),
        ("metis_robust@erased", dict(t1=0.4, t2=0.2)),
        ("ta@0.5", dict(t1=0.1, t2=0.4)),
    ):
        runs.append(_run("many_shot", 0, method, exact))
    spec = CompareSpec(
        seeds=[0],
        variants={
            "metis_robust@erased": {"method": "metis_robust", "gap_normalization": "erased"},
            "ta@0.5": {"method": "task_arithmetic", "scale": 0.5},
        },
        many_shot_methods=["consensus_ta", "metis_robust@erased", "ta@0.5"],
    )
    report = build_report(runs, tasks, spec)
    pairs = {(" ".join(c["a"]), " ".join(c["b"])): c for c in report["paired_differences"]}
    # normalized: erased (0.8, 0.5), consensus_ta (0.4, 0.75), ta@0.5 (0.2, 1.0)
    vs_cta = pairs[("many_shot metis_robust@erased", "many_shot consensus_ta")]
    assert vs_cta["average"]["per_seed"] == pytest.approx([0.65 - 0.575])
    assert vs_cta["worst"]["per_seed"] == pytest.approx([0.5 - 0.4])
    assert pairs[("many_shot metis_robust@erased", "many_shot ta@0.5")]["worst"]["per_seed"] == pytest.approx(
        [0.5 - 0.2]
    )
    assert set(pairs) == {
        ("many_shot metis_robust@erased", "many_shot consensus_ta"),
        ("many_shot metis_robust@erased", "many_shot ta@0.5"),
    }


def test_a_run_named_in_paired_with_every_run_is_paired_like_a_loss_gap_method():
    """A many-shot setting without loss gaps (task arithmetic on round updates) gets the same paired
    rows with every other run when the spec names it; a bad name is refused with the list."""
    tasks = ["t1", "t2"]
    runs = [_run("experts", 0, None, dict(t1=0.5, t2=0.4))]
    runs.append(_run("post_hoc", 0, "tsv_m", dict(t1=0.5, t2=0.2)))
    runs.append(_run("many_shot", 0, "ta@rounds", dict(t1=0.4, t2=0.4)))
    runs.append(_run("many_shot", 0, "ties", dict(t1=0.1, t2=0.4)))
    variants = {"ta@rounds": {"method": "task_arithmetic", "training": {"merge_round_updates": True}}}
    spec = CompareSpec(
        seeds=[0],
        variants=variants,
        post_hoc_methods=["tsv_m"],
        many_shot_methods=["ta@rounds", "ties"],
        paired_with_every_run=["ta@rounds"],
    )
    report = build_report(runs, tasks, spec)
    pairs = {(" ".join(c["a"]), " ".join(c["b"])): c for c in report["paired_differences"]}
    # normalized: ta@rounds (0.8, 1.0), tsv_m (1.0, 0.5), ties (0.2, 1.0)
    vs_tsv = pairs[("many_shot ta@rounds", "post_hoc tsv_m")]
    assert vs_tsv["average"]["per_seed"] == pytest.approx([0.9 - 0.75])
    assert vs_tsv["worst"]["per_seed"] == pytest.approx([0.8 - 0.5])
    assert pairs[("many_shot ta@rounds", "many_shot ties")]["worst"]["per_seed"] == pytest.approx([0.8 - 0.2])
    assert set(pairs) == {
        ("many_shot ta@rounds", "post_hoc tsv_m"),
        ("many_shot ta@rounds", "many_shot ties"),
    }
    assert not [
        c
        for c in build_report(
            runs,
            tasks,
            CompareSpec(
                seeds=[0],
                variants=variants,
                post_hoc_methods=["tsv_m"],
                many_shot_methods=["ta@rounds", "ties"],
            ),
        )["paired_differences"]
        if c["a"] == ["many_shot", "ta@rounds"]
    ]
    with pytest.raises(ValueError, match="'tsv_m' is not in many_shot_methods"):
        CompareSpec(
            seeds=[0], post_hoc_methods=["tsv_m"], many_shot_methods=["ties"], paired_with_every_run=["tsv_m"]
        )


def test_reference_rows_base_and_multitask_sft_are_normalized_paired_and_drawn(tmp_path):
    """The base model (one run) is normalized by each seed's experts; the multi-task SFT runs by
    their own seed's; many-shot METIS is paired with multi-task SFT but not with the base."""
    tasks = ["t1", "t2", "t3"]
    runs = [_run("base", None, None, dict(t1=0.1, t2=0.0, t3=0.2))]
    for seed, expert in ((0, 0.5), (1, 0.4)):
        runs.append(_run("experts", seed, None, dict(t1=expert, t2=expert, t3=0.5)))
        runs.append(_run("multitask", seed, None, dict(t1=0.3, t2=0.2, t3=0.5)))
        runs.append(_run("many_shot", seed, "metis", dict(t1=0.4, t2=0.3, t3=0.5)))
    report = build_report(runs, tasks, CompareSpec(seeds=[0, 1]))
    base = report["summaries"]["reference/base model"]
    assert base["0"]["normalized"] == pytest.approx({"t1": 0.2, "t2": 0.0, "t3": 0.4})
    assert base["1"]["normalized"] == pytest.approx({"t1": 0.25, "t2": 0.0, "t3": 0.4})
    sft = report["aggregate"]["reference/multi-task SFT"]
    assert sft["normalized"]["t1"]["mean"] == pytest.approx((0.3 / 0.5 + 0.3 / 0.4) / 2)
    pairs = {(" ".join(c["a"]), " ".join(c["b"])): c for c in report["paired_differences"]}
    vs_sft = pairs[("many_shot metis", "reference multi-task SFT")]
    # seed 0: metis (0.8, 0.6, 1.0) - sft (0.6, 0.4, 1.0); seed 1: (1.0, 0.75, 1.0) - (0.75, 0.5, 1.0)
    assert vs_sft["average"]["per_seed"] == pytest.approx([0.4 / 3, 0.5 / 3])
    assert not any("base model" in b for _, b in pairs)
    md = report["markdown"]
    assert "| **References** |" in md and "| References multi-task SFT | 0.300 / 0.300 |" in md
    assert md.count("| base | ") == 1 and "| References base model |" not in md
    written = {p.name for p in write_report(report, tmp_path)}
    assert "radar_reference.png" not in written and "radar_many_shot.png" in written


def test_paired_gains_and_the_score_tables_gain_column():
    """Base right on items 0-19 of 100, merged on 0-49: a gain of 0.30 whose per-item differences
    are 1 on 30 items, so the paired interval is 0.30 +- 1.96 sqrt(0.3 * 0.7 / 100) = [0.21, 0.39];
    a second task the two get equally right (different items) gains 0 and is a tie."""
    from metis_hf.evaluation import TaskScore, format_score_table
    from metis_hf.evaluation.uncertainty import paired_gains

    def score(task, right):
        items = [1.0 if i in right else 0.0 for i in range(100)]
        return TaskScore(
            task, sum(items) / 100, sum(items) / 100, 100, item_scores=items, item_exact_matches=items
        )

    base = {"a": score("a", range(20)), "b": score("b", range(0, 60, 2))}
    merged = {"a": score("a", range(50)), "b": score("b", range(1, 60, 2))}
    gains = paired_gains(
        {t: s.item_exact_matches for t, s in base.items()},
        {t: s.item_exact_matches for t, s in merged.items()},
    )
    value, low, high = gains["a"]
    assert (
        value == pytest.approx(0.30)
        and low == pytest.approx(0.21, abs=0.02)
        and high == pytest.approx(0.39, abs=0.02)
    )
    assert gains["b"][0] == pytest.approx(0.0) and gains["b"][1] < 0 < gains["b"][2]
    assert gains["mean"][0] == pytest.approx(0.15)
    table = format_score_table({"base": base, "merged": merged})
    assert "| a | 0.200 | 0.200 | 0.500 | 0.500 | +0.300 [" in table
    assert (
        "merged is above base beyond the 95% interval on 1 of 2 tasks; mean exact-match gain +0.150" in table
    )


def test_most_common_answer_counts_answers_as_exact_match_does_and_breaks_ties_by_order():
    """Gold answers No, Yes, " Yes ", No, Maybe: No and Yes (whitespace collapsed, as exact match
    compares) tie at 2, and the first met, No, is kept: always answering it is right on items 0 and
    3. On the first three items Yes leads 2 to 1. Scores come from the task's own scorer."""
    from datasets import Dataset

    from metis_hf.data import Task
    from metis_hf.evaluation import most_common_answer

    golds = ["No", "Yes", " Yes ", "No", "Maybe"]
    data = Dataset.from_list([{"prompt": f"q{i}", "completion": g, "answer": g} for i, g in enumerate(golds)])
    half_credit = lambda prediction, row: 0.5 if prediction in row["answer"] else 0.25  # noqa: E731
    task = Task("t", data, data, data, scorer=half_credit)
    answer, score = most_common_answer(task)
    assert answer == "No" and score.n == 5
    assert score.item_exact_matches == [1.0, 0.0, 0.0, 1.0, 0.0] and score.exact_match == pytest.approx(0.4)
    assert score.item_scores == [0.5, 0.25, 0.25, 0.5, 0.25]
    answer, score = most_common_answer(task, limit=3)
    assert answer == "Yes" and score.item_exact_matches == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="empty"):
        most_common_answer(Task("t", data, data, data.select([])))


def test_the_report_names_experts_no_better_than_the_base_or_the_most_common_answer():
    """Two tasks of 100 items, two seeds. t1: always its most common answer is right on items 0-59,
    the base on 0-9; seed 0's expert is right on exactly 0-59 (the answer distribution, +0.000
    over it), seed 1's on 0-89 (+0.30, per-item differences 1 on 30 items: interval 0.30 +- 1.96
    sqrt(0.21 / 100)). t2: the experts equal the base (right on 0-69), far above the most common
    answer (0-19)."""
    n = 100
    right = lambda k: [1] * k + [0] * (n - k)  # noqa: E731
    prior = {
        "t1": {"answer": "Yes", "score": 0.6, "exact_match": 0.6, "n": n, "item_exact_matches": right(60)},
        "t2": {"answer": "a|b", "score": 0.2, "exact_match": 0.2, "n": n, "item_exact_matches": right(20)},
    }
    runs = [_itemized("base", None, None, {"t1": right(10), "t2": right(70)})]
    for seed, t1 in ((0, 60), (1, 90)):
        runs.append(_itemized("experts", seed, None, {"t1": right(t1), "t2": right(70)}))
        runs.append(_itemized("many_shot", seed, "metis", {"t1": right(50), "t2": right(50)}))
    report = build_report(runs, ["t1", "t2"], CompareSpec(seeds=[0, 1]), prior)
    checks = {(c["seed"], c["task"]): c for c in report["expert_checks"]}
    assert checks[(0, "t1")]["over_most_common"] == pytest.approx([0.0, 0.0, 0.0])
    assert checks[(0, "t1")]["over_base"][0] == pytest.approx(0.5) and checks[(0, "t1")]["over_base"][1] > 0
    gain, low, high = checks[(1, "t1")]["over_most_common"]
    half_width = 1.96 * math.sqrt(0.21 / n)
    assert gain == pytest.approx(0.3) and low == pytest.approx(0.3 - half_width, abs=0.02)
    assert high == pytest.approx(0.3 + half_width, abs=0.02)
    assert checks[(1, "t2")]["over_base"] == pytest.approx([0.0, 0.0, 0.0])
    assert checks[(1, "t2")]["over_most_common"][0] == pytest.approx(0.5)
    md = report["markdown"]
    assert "| always its most common answer | 0.600 / 0.600 | 0.200 / 0.200 |" in md
    assert "| 0 | t1 | 0.100 | 0.600 | +0.500 [" in md and '| "Yes": 0.600 | +0.000 [+0.000, +0.000] |' in md
    assert '"a\\|b": 0.200' in md  # a | in an answer does not split the markdown cell
    assert "Not above the base model: t2 (seeds 0, 1)." in md
    assert "Not above always giving the task's most common answer: t1 (seed 0)." in md
    assert "Caution: some experts are not above" in md.split("### Raw")[0]
    without = build_report(runs, ["t1", "t2"], CompareSpec(seeds=[0, 1]))  # no answers known
    assert "most common" not in without["markdown"] and "Not above the base model: t2" in without["markdown"]


@pytest.mark.bad_input
def test_eval_of_a_missing_folder_or_a_truncated_adapter_names_it(tmp_path, capsys, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from metis_hf.commands import main
    from tests.conftest import make_tiny_model, make_tokenizer

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "outputs/merged", "--tasks", "gcd", "--test-size", "2"]) == 2
    error = capsys.readouterr().err
    assert "model 'outputs/merged': no such folder" in error and "Traceback" not in error

    tokenizer = make_tokenizer()
    base = make_tiny_model(len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    assert main(["eval", str(tmp_path / "adapter"), "--tasks", "gcd", "--test-size", "2"]) == 2
    error = capsys.readouterr().err
    assert f"{weights}: not a readable safetensors file" in error and "Traceback" not in error
    weights.unlink()
    assert main(["eval", str(tmp_path / "adapter"), "--tasks", "gcd", "--test-size", "2"]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
