"""`metis-hf compare` end to end on a tiny local model and real reasoning-gym tasks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metis_hf.commands import main
from metis_hf.workflows.compare import RESULT_FILE, Comparison
from metis_hf.workflows.compare_training import RunTraining
from tests.conftest import write_tiny_recipe

TASKS = ("chain_sum", "gcd", "letter_counting")
RETENTION_FIXTURE = Path(__file__).parent / "fixtures" / "retention" / "task.json"


def _answers_that_depend_on_the_model(right):
    """Stands in for greedy generation, which a random tiny model never gets right (and 0 / 0
    would pass any normalization check): an item is answered right when a fingerprint of the
    model's logits on its prompt says so, so each run (base, expert, merge) scores differently."""

    def generate(model, tokenizer, prompts, *args, **kwargs):
        answers = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                fingerprint = float(model(input_ids=ids).logits[0, -1].sum())
            answers.append(right[prompt] if int(abs(fingerprint) * 1e5) % 3 else "wrong")
        return answers

    return generate


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_tokenizer):
    from metis_hf.data import build_tasks
    from metis_hf.recipe import load_recipe

    tmp_path = tmp_path_factory.mktemp("compare")
    compare = {
        "seeds": [0, 1],
        "post_hoc_methods": ["task_arithmetic", "metis", "ta@2x", "ta@auto", "tsv_m"],
        "many_shot_methods": ["metis", "robust@answer", "iso_c"],
        "metric": "score",
        "variants": {
            "ta@2x": {"method": "task_arithmetic", "scale": 2 / len(TASKS)},
            "ta@auto": {"method": "task_arithmetic", "scale": "auto"},
            "robust@answer": {"method": "metis_robust", "training": {"gap_tokens": "completion"}},
        },
    }
    retention = [{"name": "toy_mc", "path": str(RETENTION_FIXTURE)}]
    recipe = write_tiny_recipe(
        tmp_path,
        tiny_tokenizer,
        tasks=TASKS,
        training={"num_rounds": 2, "local_steps": 1},
        compare=compare,
        evaluation={"batch_size": 4, "max_new_tokens": 3, "retention": retention},
    )
    out = tmp_path / "cmp"
    tasks = build_tasks(load_recipe(recipe).tasks)
    right = {row["prompt"]: row["answer"] for task in tasks.values() for row in task.test}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "metis_hf.evaluation.generation.generate_answers", _answers_that_depend_on_the_model(right)
        )
        assert main(["compare", str(recipe), "--output-dir", str(out)]) == 0
    return recipe, out


def test_compare_writes_every_run_table_and_plot(compared):
    from metis_hf.recipe import load_recipe

    recipe, out = compared
    results = json.loads((out / "results.json").read_text())
    kinds = sorted((r["kind"], r["seed"] or 0, r["method"] or "") for r in results["runs"])
    assert len(kinds) == 1 + 2 * (
        2 + 5 + 3
    )  # base; per seed experts, multi-task SFT, 5 post-hoc, 3 many-shot
    for name in ("results.md", "radar_post_hoc.png", "radar_many_shot.png", "round_curves.png"):
        assert (out / name).stat().st_size > 0
    # normalized = the run's score / the same seed's expert score, from the runs' own files
    for seed in (0, 1):
        experts = json.loads((out / "runs" / f"seed{seed}" / "experts" / "result.json").read_text())
        run = json.loads((out / "runs" / f"seed{seed}" / "many_shot-metis" / "result.json").read_text())
        summary = results["summaries"]["many_shot/metis"][str(seed)]
        for task in TASKS:
            expert = experts["scores"][task]["score"]
            assert expert > 0  # a real ratio, not 0 / 0
            assert summary["normalized"][task] == pytest.approx(run["scores"][task]["score"] / expert)
        assert len({round(v, 6) for v in summary["normalized"].values()}) > 1  # not all one value
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        # the share of the expert's answer-loss gain kept, from the runs' own answer losses
        base = json.loads((out / "runs" / "base" / "result.json").read_text())["answer_losses"]
        for task in TASKS:
            gain = base[task] - experts["answer_losses"][task]
            expected = (base[task] - run["answer_losses"][task]) / gain if gain > 0 else None
            kept = summary["gain_kept"]["kept"][task]
            assert kept == pytest.approx(expected) if expected is not None else kept != kept
        assert len(run["scores"][TASKS[0]]["item_scores"]) == run["scores"][TASKS[0]]["n"]
        # retention: the run's accuracy on the toy multiple-choice task over the base model's
        base_accuracy = json.loads((out / "runs" / "base" / "result.json").read_text())["retention"]["toy_mc"]
        assert run["retention"]["toy_mc"]["n"] == 6 and "retention" not in experts
        assert summary["retention"]["toy_mc"] == pytest.approx(
            run["retention"]["toy_mc"]["accuracy"] / base_accuracy["accuracy"]
        )
        # the joint-training reference: one adapter, the experts' optimizer steps all together
        multitask = json.loads((out / "runs" / f"seed{seed}" / "multitask" / "result.json").read_text())
        assert multitask["optimizer_steps"] == experts["optimizer_steps"] == len(TASKS) * 2 * 1
        assert set(multitask["scores"]) == set(TASKS) and "reference/multi-task SFT" in results["aggregate"]
    # each expert against the base and against always giving its task's most common test answer
    tasks = Comparison(load_recipe(recipe), out).tasks
    for task in TASKS:
        golds = [" ".join(a.split()) for a in tasks[task].test["answer"]]
        top = max(golds.count(a) for a in golds)
        assert results["most_common_answers"][task]["answer"] == next(
            a for a in golds if golds.count(a) == top
        )
        assert results["most_common_answers"][task]["exact_match"] == pytest.approx(top / len(golds))
    base_scores = json.loads((out / "runs" / "base" / "result.json").read_text())["scores"]
    experts = json.loads((out / "runs" / "seed1" / "experts" / "result.json").read_text())["scores"]
    check = next(c for c in results["expert_checks"] if (c["seed"], c["task"]) == (1, "gcd"))
    assert check["over_base"][0] == pytest.approx(experts["gcd"]["score"] - base_scores["gcd"]["score"])
    assert check["over_most_common"][0] == pytest.approx(
        experts["gcd"]["score"] - results["most_common_answers"]["gcd"]["score"]
    )
    markdown = (out / "results.md").read_text()
    assert "### Do the experts learn their tasks?" in markdown
    assert "| many_shot metis | post_hoc metis |" in markdown
    assert "gain kept, on answer-token validation loss" in markdown
    assert (
        "### Knowledge retention" in markdown and "| Many-shot metis | " in markdown.split("### Knowledge")[1]
    )
    assert "95% interval over the test items" in markdown and " [" in markdown.split("### Raw")[0]


def test_post_hoc_merge_is_the_merge_of_the_saved_experts(compared):
    _, out = compared
    experts = [
        load_file(
            out / "runs" / "seed0" / "experts" / "adapter" / "task_adapters" / t / "adapter_model.safetensors"
        )
        for t in TASKS
    ]
    merged = load_file(
        out / "runs" / "seed0" / "post_hoc-task_arithmetic" / "adapter" / "adapter_model.safetensors"
    )
    assert set(merged) == set(experts[0])
    for key, value in merged.items():
        torch.testing.assert_close(value, sum(e[key] for e in experts) / len(experts))  # scale 1/T
    assert not torch.equal(*(next(iter(e.values())) for e in experts[:2]))  # the experts differ
    variant = load_file(out / "runs" / "seed0" / "post_hoc-ta@2x" / "adapter" / "adapter_model.safetensors")
    for key, value in variant.items():  # the variant's own scale, 2/T
        torch.testing.assert_close(value, 2 * sum(e[key] for e in experts) / len(experts))
    metis = json.loads((out / "runs" / "seed0" / "post_hoc-metis" / "result.json").read_text())
    base = json.loads((out / "runs" / "base" / "result.json").read_text())
    expert_losses = json.loads((out / "runs" / "seed0" / "experts" / "result.json").read_text())["losses"]
    for task in TASKS:  # G_0 of a post-hoc METIS merge is the base model
        gap = base["losses"][task] - expert_losses[task]
        assert metis["loss_gaps"][task] == pytest.approx(gap)


def test_scale_auto_keeps_the_candidate_with_the_lowest_validation_loss(compared):
    from metis_hf.merging.scale_search import SCALE_CANDIDATES

    _, out = compared
    run = out / "runs" / "seed0" / "post_hoc-ta@auto"
    result = json.loads((run / "result.json").read_text())
    search = {float(k): v for k, v in result["scale_search"]["validation_loss"].items()}
    assert set(SCALE_CANDIDATES) <= set(search) and len({round(v, 6) for v in search.values()}) > 3
    chosen = result["scale_search"]["chosen"]
    assert search[chosen] == min(search.values())
    # the saved adapter is the merge at that scale, and its own validation loss is the one searched
    assert sum(result["losses"].values()) / len(TASKS) == pytest.approx(search[chosen], rel=1e-6)
    experts = [
        load_file(
            out / "runs" / "seed0" / "experts" / "adapter" / "task_adapters" / t / "adapter_model.safetensors"
        )
        for t in TASKS
    ]
    for key, value in load_file(run / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, chosen * sum(e[key] for e in experts))
    assert result["weights"] == {t: chosen for t in TASKS}


def test_the_scale_search_goes_past_an_edge_that_wins_and_stops_where_the_loss_rises():
    from metis_hf.merging.scale_search import SCALE_CANDIDATES, search_scale

    def bowl(minimum: float):  # a loss whose minimum over log-scale lies at ``minimum``
        return lambda scale: (math.log(scale) - math.log(minimum)) ** 2

    chosen, losses = search_scale(bowl(1.2))  # inside the range: the candidates alone
    assert chosen == 1.0 and sorted(losses) == sorted(SCALE_CANDIDATES)
    chosen, losses = search_scale(bowl(5.0))  # past 3: 4.5 wins, 6.75 loses, the search stops
    assert chosen == 4.5 and sorted(set(losses) - set(SCALE_CANDIDATES)) == [4.5, 6.75]
    chosen, losses = search_scale(bowl(0.05))  # below 0.1: 0.1 / 1.5, then 0.1 / 1.5**2 ...
    assert chosen == pytest.approx(0.1 / 1.5**2, rel=1e-4) and min(losses) == pytest.approx(
        0.1 / 1.5**3, rel=1e-4
    )
    chosen, losses = search_scale(bowl(1e4))  # six more at most
    assert len(losses) == len(SCALE_CANDIDATES) + 6 and chosen == max(losses)
    # a merge whose loss is not finite (diverged) never wins, wherever it lies
    chosen, _ = search_scale(lambda s: math.nan if s < 0.3 or s > 2 else (s - 1) ** 2)
    assert chosen == 1.0


def test_post_hoc_svd_merge_is_exact_in_the_core_space(compared):
    """TSV-M of three rank-4 experts is written as one rank-12 adapter whose every module's update
    is TSV-M of the experts' updates (scale 1/T), computed here from the dense updates. Tolerance
    1e-3 of the largest entry: after one step from a shared initialisation the experts' row spaces
    nearly coincide, and TSV-M's polar decomposition of their stack is ill-conditioned in float32."""
    from metis_hf.merging import merge
    from metis_hf.merging.task_vectors import lora_scaling, lora_to_dense

    _, out = compared
    folder = out / "runs" / "seed0" / "experts" / "adapter" / "task_adapters"
    config = json.loads((folder / TASKS[0] / "adapter_config.json").read_text())
    scaling = lora_scaling(config["r"], config["lora_alpha"])
    experts = [lora_to_dense(load_file(folder / t / "adapter_model.safetensors"), scaling) for t in TASKS]
    run = out / "runs" / "seed0" / "post_hoc-tsv_m" / "adapter"
    merged_config = json.loads((run / "adapter_config.json").read_text())
    assert merged_config["r"] == 3 * config["r"]
    merged_scaling = lora_scaling(merged_config["r"], merged_config["lora_alpha"])
    assert merged_scaling == pytest.approx(scaling)
    merged = lora_to_dense(load_file(run / "adapter_model.safetensors"), merged_scaling)
    for module, delta in merged.items():
        expected = merge("tsv_m", [e[module] for e in experts], scale=1 / 3)
        torch.testing.assert_close(delta, expected, atol=1e-3 * float(expected.abs().max()), rtol=0)


def test_compare_resumes_without_recomputing(compared, monkeypatch):
    recipe, out = compared
    before = (out / "results.json").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    for kind in ("base", "experts", "multitask", "post_hoc", "many_shot"):
        monkeypatch.setattr(Comparison, f"run_{kind}", refuse)
    assert main(["compare", str(recipe), "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["summaries"] == json.loads(before)["summaries"]


def test_compare_refuses_results_computed_under_other_settings(compared, tmp_path, capsys):
    import yaml

    recipe, out = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    data = yaml.safe_load(recipe.read_text())
    data["training"]["learning_rate"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    before = {p: p.read_bytes() for p in copy.rglob("result.json")}
    assert main(["compare", str(changed), "--output-dir", str(copy)]) == 2
    err = capsys.readouterr().err
    # the base model's result does not depend on training; seed 0's experts do
    assert str(copy / "runs" / "seed0" / "experts") in err
    assert "training.learning_rate" in err and "0.5 now" in err
    assert {p: p.read_bytes() for p in copy.rglob("result.json")} == before  # nothing rewritten
    recorded = json.loads((out / "runs" / "seed0" / "experts" / "result.json").read_text())
    assert recorded["versions"]["torch"] == torch.__version__


def test_a_folder_kept_with_its_results_only_resumes(compared, tmp_path, monkeypatch):
    """Results copied without adapters (what a results archive keeps): a post-hoc run still to do
    gets its seed's experts trained again, the same as before; other seeds' experts are not."""
    from metis_hf.data import build_tasks
    from metis_hf.recipe import load_recipe

    recipe, out = compared
    copy = tmp_path / "cmp"
    for path in out.rglob(RESULT_FILE):
        target = copy / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    shutil.rmtree(copy / "runs" / "seed0" / "post_hoc-task_arithmetic")
    tasks = build_tasks(load_recipe(recipe).tasks)
    right = {row["prompt"]: row["answer"] for task in tasks.values() for row in task.test}
    monkeypatch.setattr(
        "metis_hf.evaluation.generation.generate_answers", _answers_that_depend_on_the_model(right)
    )
    trained = []
    original = Comparison.run_experts
    monkeypatch.setattr(
        Comparison,
        "run_experts",
        lambda self, run, folder: trained.append(run.seed) or original(self, run, folder),
    )
    assert main(["compare", str(recipe), "--output-dir", str(copy)]) == 0
    assert trained == [0]
    redone, first = (
        json.loads((root / "runs" / "seed0" / "post_hoc-task_arithmetic" / RESULT_FILE).read_text())
        for root in (copy, out)
    )
    for task in TASKS:
        assert redone["losses"][task] == pytest.approx(first["losses"][task], rel=1e-5)


def test_post_hoc_metis_reads_losses_from_older_result_files(compared, tmp_path):
    """Result files of earlier versions kept each validation loss inside the task's scores."""
    recipe, out = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    for run in ("base", "seed0/experts"):
        path = copy / "runs" / run / "result.json"
        result = json.loads(path.read_text())
        for task, loss in result.pop("losses").items():
            result["scores"][task]["loss"] = loss
        path.write_text(json.dumps(result))
    shutil.rmtree(copy / "runs" / "seed0" / "post_hoc-metis")
    assert main(["compare", str(recipe), "--output-dir", str(copy)]) == 0
    redone = json.loads((copy / "runs" / "seed0" / "post_hoc-metis" / "result.json").read_text())
    first = json.loads((out / "runs" / "seed0" / "post_hoc-metis" / "result.json").read_text())
    assert redone["loss_gaps"] == pytest.approx(first["loss_gaps"])
    assert redone["weights"] == pytest.approx(first["weights"])


def test_a_variants_training_overrides_reach_its_runs_only(compared):
    _, out = compared
    for seed in (0, 1):
        variant = json.loads(
            (out / "runs" / f"seed{seed}" / "many_shot-robust@answer" / "result.json").read_text()
        )
        metis = json.loads((out / "runs" / f"seed{seed}" / "many_shot-metis" / "result.json").read_text())
        first, second = variant["rounds"]
        for task in TASKS:  # round 2's gap: completion loss of round 1's merge minus the local one
            expected = (
                first[f"merge/completion_loss_merged/{task}"] - second[f"merge/completion_loss_local/{task}"]
            )
            assert second[f"merge/loss_gap/{task}"] == pytest.approx(expected)
            assert second[f"merge/completion_loss_local/{task}"] != second[f"merge/val_loss_local/{task}"]
        assert not any(key.startswith("merge/completion_loss") for key in metis["rounds"][0])


@pytest.mark.parametrize(
    "compare,message",
    [
        (
            {"many_shot_methods": ["metis", "magic"]},
            "compare.many_shot_methods: unknown merge method 'magic'",
        ),
        (
            {
                "many_shot_methods": ["x"],
                "variants": {"x": {"method": "metis", "training": {"gap_token": "all"}}},
            },
            "compare.variants.x: training.gap_token: unknown MetisConfig field",
        ),
        (
            {
                "many_shot_methods": ["x"],
                "variants": {"x": {"method": "metis", "training": {"gap_tokens": "all"}}},
            },
            "compare.variants.x: training: gap_tokens must be one of",
        ),
        (
            {
                "many_shot_methods": ["x"],
                "variants": {"x": {"method": "task_arithmetic", "training": {"scale_objective": "worst"}}},
            },
            "compare.variants.x: training: scale_objective must be one of ('multitask_loss', 'worst_task'), "
            "got 'worst'.",
        ),
        (
            {"many_shot_methods": ["ties"], "method_params": {"ties": {"scale": "auto"}}},
            "compare: ties: training: ties merge of 2 tasks (round 1, merge_params "
            '{"scale": "auto"}): scale: auto scales each round\'s merged update: set merge_round_updates',
        ),
        (
            {
                "post_hoc_methods": ["metis"],
                "many_shot_methods": [],
                "method_params": {"metis": {"scale": "auto"}},
            },
            "compare: metis: post hoc searches `scale`, which metis does not take.",
        ),
        (
            {
                "post_hoc_methods": ["x"],
                "many_shot_methods": [],
                "variants": {"x": {"method": "metis_robust", "beta": "auto"}},
            },
            "compare: x: post hoc searches `scale`, which metis_robust does not take.",
        ),
        ({"experts": {"chain_sum": "/nowhere"}}, "compare.experts: tasks ['gcd'] are missing."),
        (
            {"experts": {"chain_sum": "/nowhere", "gcd": "/nowhere"}},
            "compare.experts: chain_sum: no adapter_config.json in /nowhere (a PEFT adapter folder).",
        ),
    ],
)
@pytest.mark.bad_input
def test_compare_bad_recipe_is_named(tmp_path, tiny_tokenizer, capsys, compare, message):
    recipe = write_tiny_recipe(tmp_path, tiny_tokenizer, compare=compare)
    assert main(["compare", str(recipe), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o" / "runs").exists()  # refused before any run


def test_compare_on_experts_trained_before_trains_none(compared, tmp_path, monkeypatch):
    """A previous compare's experts (each seed its own), then one seed's adapters given per task:
    nothing is trained, the experts score as before, and the post-hoc merge is the same."""
    import yaml

    from metis_hf.data import build_tasks
    from metis_hf.recipe import load_recipe

    recipe, out = compared
    tasks = build_tasks(load_recipe(recipe).tasks)
    right = {row["prompt"]: row["answer"] for task in tasks.values() for row in task.test}
    monkeypatch.setattr(
        "metis_hf.evaluation.generation.generate_answers", _answers_that_depend_on_the_model(right)
    )

    def refuse(*args, **kwargs):
        raise AssertionError("an expert was trained")

    monkeypatch.setattr(RunTraining, "train", refuse)
    data = yaml.safe_load(recipe.read_text())
    compare = {"seeds": [0, 1], "post_hoc_methods": ["task_arithmetic"], "many_shot_methods": []}
    adapters = out / "runs" / "seed1" / "experts" / "adapter" / "task_adapters"
    for name, experts, seeds in (
        ("from_compare", str(out), [0, 1]),
        ("per_task", {t: str(adapters / t) for t in TASKS}, [1]),
    ):
        data["compare"] = {**compare, "seeds": seeds, "experts": experts, "multitask_sft": False}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["compare", str(path), "--output-dir", str(tmp_path / name)]) == 0
        for seed in seeds:
            for run in ("experts", "post_hoc-task_arithmetic"):
                again = json.loads(
                    (tmp_path / name / "runs" / f"seed{seed}" / run / "result.json").read_text()
                )
                first = json.loads(
                    (
                        out / "runs" / f"seed{1 if name == 'per_task' else seed}" / run / "result.json"
                    ).read_text()
                )
                for task in TASKS:
                    assert again["scores"][task]["score"] == first["scores"][task]["score"]
                    assert again["losses"][task] == pytest.approx(first["losses"][task], rel=1e-5)
    experts = [
        json.loads((out / "runs" / f"seed{s}" / "experts" / "result.json").read_text()) for s in (0, 1)
    ]
    assert experts[0]["losses"] != experts[1]["losses"]  # so matching seed 1's shows its adapters were used


def test_compare_report_card_and_its_dry_run_push(compared, tmp_path):
    from huggingface_hub import metadata_load

    _, out = compared
    meta = metadata_load(out / "README.md")
    assert "metis" in meta["tags"] and "evaluation" in meta["tags"]
    card = (out / "README.md").read_text()
    assert (out / "results.md").read_text().strip().splitlines()[0] in card
    assert "![radar_many_shot.png](radar_many_shot.png)" in card
    stage = tmp_path / "stage"
    assert main(["push", str(out), "me/report", "--dry-run", "--stage-dir", str(stage)]) == 0
    staged = {p.name for p in stage.rglob("*") if p.is_file()}
    assert {"README.md", "results.md", "results.json", "round_curves.png"} <= staged
    assert not (stage / "runs").exists()  # the per-run adapters stay local


def test_many_shot_runs_branched_from_a_shared_round_one_equal_runs_trained_alone(
    compared, tmp_path, monkeypatch
):
    """The fixture's many-shot runs share round 1 per seed (one branch point); each run trained
    alone (compare.branch_many_shot false) ends with the same merged adapter and round records."""
    import yaml

    recipe, out = compared
    monkeypatch.setattr(
        "metis_hf.evaluation.generation.generate_answers",
        lambda model, tok, prompts, *a, **k: [""] * len(prompts),
    )
    assert not list((out / "runs").glob("seed*/branch_point-*"))  # removed once their runs finished
    data = yaml.safe_load(recipe.read_text())
    data["compare"].update(
        seeds=[1],
        post_hoc_methods=[],
        many_shot_methods=["robust@answer", "iso_c"],
        multitask_sft=False,
        branch_many_shot=False,
    )
    path = tmp_path / "alone.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["compare", str(path), "--output-dir", str(tmp_path / "alone")]) == 0
    for run in ("many_shot-robust@answer", "many_shot-iso_c"):
        branched = json.loads((out / "runs" / "seed1" / run / "result.json").read_text())
        alone = json.loads((tmp_path / "alone" / "runs" / "seed1" / run / "result.json").read_text())
        assert "branch_seconds" in branched and "branch_seconds" not in alone
        for mine, theirs in zip(branched["rounds"], alone["rounds"], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-6)
        expected = load_file(
            tmp_path / "alone" / "runs" / "seed1" / run / "adapter" / "adapter_model.safetensors"
        )
        got = load_file(out / "runs" / "seed1" / run / "adapter" / "adapter_model.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


class _Interrupted(Exception):
    """Stands in for a compare killed mid-training."""


def test_a_compare_interrupted_mid_training_resumes_each_run_to_the_same_adapters(
    tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    """Experts, a branch point's trunk and a branched many-shot run are each interrupted after a
    checkpoint (every 3 steps) and resumed by starting the compare again: every run ends with the
    adapters and scores of an uninterrupted compare. Checkpoints left under other settings are
    not resumed."""
    import yaml
    from transformers import TrainerCallback

    from metis_hf.data import build_tasks
    from metis_hf.recipe import load_recipe
    from metis_hf.workflows.compare import run_compare

    compare = {
        "seeds": [0],
        "post_hoc_methods": ["task_arithmetic"],
        "many_shot_methods": ["metis", "task_arithmetic"],
        "multitask_sft": False,
        "checkpoint_steps": 3,
    }
    # 3 tasks x 2 local steps x 2 rounds: experts train 12 steps (4 per task), many-shot merges at 6 and 12
    recipe = write_tiny_recipe(tmp_path, tiny_tokenizer, tasks=TASKS, compare=compare)
    tasks = build_tasks(load_recipe(recipe).tasks)
    right = {row["prompt"]: row["answer"] for task in tasks.values() for row in task.test}
    monkeypatch.setattr(
        "metis_hf.evaluation.generation.generate_answers", _answers_that_depend_on_the_model(right)
    )
    assert main(["compare", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0

    interrupts: list[tuple[str, int]] = []  # (the run folder whose trainer stops, after which step)

    class InterruptAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            run_folder = Path(args.output_dir).parent.name  # trainers train in <run folder>/trainer
            run_folder = "trunk" if run_folder.startswith("branch_point") else run_folder
            if interrupts and interrupts[0] == (run_folder, state.global_step):
                interrupts.pop(0)
                raise _Interrupted(f"{run_folder} at step {state.global_step}")

    original = RunTraining.trainer

    def with_interrupts(self, args, settings, *rest):
        trainer, checkpoint = original(self, args, settings, *rest)
        trainer.add_callback(InterruptAt())
        return trainer, checkpoint

    monkeypatch.setattr(RunTraining, "trainer", with_interrupts)
    out = tmp_path / "broken"
    experts_trainer = out / "runs" / "seed0" / "experts" / "trainer"

    def interrupted(path: Path, folder: str, step: int) -> str:
        interrupts.append((folder, step))
        with pytest.raises(_Interrupted):
            run_compare(path, out)
        assert not interrupts
        return capsys.readouterr().out

    interrupted(recipe, "experts", 7)
    assert sorted(p.name for p in experts_trainer.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # the same folder under another learning rate: those checkpoints are not resumed, but removed
    data = yaml.safe_load(recipe.read_text())
    data["training"]["learning_rate"] = 1e-3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    assert "checkpoints of other settings, starting over" in interrupted(other, "experts", 2)
    assert not list(experts_trainer.glob("checkpoint-*"))
    assert "starting over" in interrupted(recipe, "experts", 7)
    printed = interrupted(recipe, "trunk", 4)  # experts resume at 6 and finish; the trunk stops
    assert f"resuming an interrupted run from {experts_trainer / 'checkpoint-6'}" in printed
    assert "resuming" in interrupted(recipe, "many_shot-metis", 10)  # the trunk resumes at 3
    run_compare(recipe, out)  # metis resumes at 9; task arithmetic branches at 6 and runs whole

    for run, resumed_at in (("experts", 6), ("many_shot-metis", 9), ("many_shot-task_arithmetic", None)):
        whole, broken = (
            json.loads((root / "runs" / "seed0" / run / RESULT_FILE).read_text())
            for root in (tmp_path / "whole", out)
        )
        assert broken.get("resumed_at_step") == resumed_at and "resumed_at_step" not in whole
        assert broken["scores"] == whole["scores"]
        assert broken["answer_losses"] == pytest.approx(whole["answer_losses"], abs=1e-6)
        for mine, theirs in zip(broken.get("rounds", []), whole.get("rounds", []), strict=True):
            assert mine == pytest.approx(theirs, abs=1e-6)
        adapters = sorted((tmp_path / "whole" / "runs" / "seed0" / run / "adapter").rglob("*.safetensors"))
        assert adapters
        for path in adapters:
            expected = load_file(path)
            got = load_file(out / path.relative_to(tmp_path / "whole"))
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert not list((out / "runs" / "seed0").glob("branch_point-*"))


@pytest.mark.bad_input
def test_compare_refuses_validation_that_scores_no_token_before_any_work(tmp_path, tiny_tokenizer, capsys):
    """Every validation loss would be 0: the scale search would pick its smallest candidate."""
    recipe = write_tiny_recipe(
        tmp_path,
        tiny_tokenizer,
        training={"max_length": 4, "completion_only_loss": True},
        compare={
            "post_hoc_methods": ["ta@auto"],
            "many_shot_methods": [],
            "multitask_sft": False,
            "variants": {"ta@auto": {"method": "task_arithmetic", "scale": "auto"}},
        },
    )
    assert main(["compare", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "validation: no example has a completion token left within max_length=4" in error
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "kind, message",
    [
        ("another model", "has shape (4, 48), where the recipe's model"),
        (
            "other targets",
            "target_modules is ['k_proj', 'q_proj'], the recipe's lora has ['q_proj', 'v_proj']",
        ),
        ("other rank", "r is 2, the recipe's lora has 4"),
        ("NaN", "holds NaN or infinite values"),
    ],
)
def test_experts_that_do_not_fit_the_recipe_are_refused_before_any_work(
    tmp_path, tiny_tokenizer, capsys, kind, message
):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import make_tiny_model

    experts = {}
    for task in ("chain_sum", "gcd"):
        hidden = 48 if kind == "another model" else 32
        targets = ["q_proj", "k_proj"] if kind == "other targets" else ["q_proj", "v_proj"]
        model = make_tiny_model(len(tiny_tokenizer), hidden=hidden)
        adapter = get_peft_model(
            model, LoraConfig(r=2 if kind == "other rank" else 4, target_modules=targets)
        )
        if kind == "NaN":
            with torch.no_grad():
                next(p for n, p in adapter.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
        adapter.save_pretrained(tmp_path / task)
        experts[task] = str(tmp_path / task)
    recipe = write_tiny_recipe(
        tmp_path, tiny_tokenizer, compare={"experts": experts, "many_shot_methods": []}
    )
    assert main(["compare", str(recipe), "--output-dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert f"compare.experts: chain_sum: {tmp_path / 'chain_sum'}: " in error and message in error
    assert not (tmp_path / "o" / "runs").exists()
