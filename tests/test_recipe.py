from pathlib import Path

import pytest

from metis_hf.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    compare_merge_spec,
    default_recipe_path,
    load_recipe,
    lora_config_from_recipe,
    metis_config_from_recipe,
)
from metis_hf.schema import parse

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_is_the_offline_cpu_recipe():
    # recipes/offline/cpu-3tasks.yaml links to the package's copy (read through, for any install)
    assert default_recipe_path().read_text() == (ROOT / "recipes/offline/cpu-3tasks.yaml").read_text()
    recipe = load_recipe()
    assert recipe.model == "smollm2-135m-instruct" and len(recipe.tasks) == 3


@pytest.mark.bad_input
def test_unknown_key_and_wrong_type_name_their_path():
    with pytest.raises(RecipeError, match=r"^tasks\[1\]\.train_sise: unknown key"):
        parse(Recipe, {"tasks": [{"name": "a"}, {"name": "b", "train_sise": 3}]})
    with pytest.raises(
        RecipeError, match=r"^tasks\[0\]\.train_size: Input should be a valid integer \(got 'many'\)"
    ):
        parse(Recipe, {"tasks": [{"name": "a", "train_size": "many"}]})
    with pytest.raises(RecipeError, match=r"^evaluation\.limit"):
        parse(Recipe, {"tasks": [{"name": "a"}], "evaluation": {"limit": [1]}})
    with pytest.raises(RecipeError, match="at least one task"):
        parse(Recipe, {"tasks": []})


def test_overrides_parse_yaml_values():
    data = apply_overrides(
        {"tasks": [{"name": "a"}], "seed": 0}, ["seed=3", "tasks.0.train_size=7", "lora.r=8"]
    )
    assert data == {"tasks": [{"name": "a", "train_size": 7}], "seed": 3, "lora": {"r": 8}}
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["seed"])


@pytest.mark.bad_input
def test_broken_yaml_is_reported(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("tasks: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_recipe_validates(path, tmp_path):
    recipe = load_recipe(path)
    config = metis_config_from_recipe(recipe, tmp_path, use_cpu=True)
    assert config.num_rounds >= 1 and recipe.tasks
    # no setting stated twice: compare takes the training section's merge setting itself
    training = config.merge_spec
    restated = {
        key: value
        for key, value in recipe.compare.method_params.get(training.method, {}).items()
        if training.params.get(key) == value
    }
    assert restated == {}
    assert lora_config_from_recipe(recipe).r >= 1


def test_paper_recipes_name_real_harness_tasks_and_metrics():
    """Every harness task a paper recipe names is in the installed lm-evaluation-harness index, with
    the metric (and filter) the recipe reads."""
    from metis_hf.evaluation.harness import task_manager

    manager = task_manager()
    paper = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
    assert len(paper) == 4
    for path in paper:
        recipe = load_recipe(path)
        assert [t.name for t in recipe.tasks] == ["instruction_following", "math", "multilingual", "safety"]
        assert all(t.train_size == 1000 for t in recipe.tasks) and recipe.training["num_rounds"] == 5
        for score in recipe.evaluation.harness:
            for task in score.tasks:
                assert task in manager.all_tasks, f"{path.name}: unknown harness task {task}"
                config = manager.task_index[task].cfg
                metric, _, flt = score.metric.partition(",")
                assert metric in {m["metric"] for m in config.get("metric_list", [])}, f"{task}: no {metric}"
                filters = {f["name"] for f in config.get("filter_list", [])}
                assert flt == "none" or flt in filters, f"{path.name}: {task} has no filter {flt}"
        assert [r.name for r in recipe.evaluation.retention] == ["CoQA", "PubMedQA"]
        for score in recipe.evaluation.retention:
            for task in score.harness:
                config = manager.task_index[task].cfg
                metric = score.metric.partition(",")[0]
                assert metric in {m["metric"] for m in config.get("metric_list", [])}, f"{task}: no {metric}"


@pytest.mark.bad_input
def test_compare_variants_resolve_and_bad_variants_are_named():
    def compare(**spec):
        return parse(Recipe, {"tasks": [{"name": "a"}], "compare": spec}).compare

    spec = compare(
        many_shot_methods=["task_arithmetic", "ta@0.5"],
        method_params={"task_arithmetic": {"scale": 0.2}},
        variants={"ta@0.5": {"method": "task_arithmetic", "scale": 0.5}},
    )
    assert spec.resolve("ta@0.5") == ("task_arithmetic", {"scale": 0.5})
    assert spec.resolve("task_arithmetic") == ("task_arithmetic", {"scale": 0.2})
    assert spec.variants["ta@0.5"] == {"method": "task_arithmetic", "scale": 0.5}  # not consumed
    answer = {"method": "metis_robust", "floor": 0.1, "training": {"gap_tokens": "completion"}}
    spec = compare(many_shot_methods=["r@answer"], variants={"r@answer": answer})
    assert spec.resolve("r@answer") == ("metis_robust", {"floor": 0.1})
    assert spec.training_overrides("r@answer") == {"gap_tokens": "completion"}
    assert spec.training_overrides("metis") == {}
    with pytest.raises(RecipeError, match=r"compare.variants: 'y': 'training' must be a mapping"):
        compare(variants={"y": {"method": "ties", "training": ["gap_tokens"]}})
    with pytest.raises(RecipeError, match=r"variants: 'ties' is a registered method"):
        compare(variants={"ties": {"method": "ties"}})
    with pytest.raises(RecipeError, match=r"compare.variants: 'x' needs 'method'"):
        compare(variants={"x": {"scale": 0.5}})
    with pytest.raises(RecipeError, match=r"variants: 'a/b' names a run folder"):
        compare(variants={"a/b": {"method": "ties"}})
    with pytest.raises(
        RecipeError, match=r"many_shot_methods: unknown merge method 'tb@0.5'.*variants: ta@0.5"
    ):
        compare(many_shot_methods=["tb@0.5"], variants={"ta@0.5": {"method": "task_arithmetic"}})


def test_compare_takes_the_training_merge_setting_unless_a_variant_states_another(tmp_path):
    from metis_hf.merging.spec import MergeSpec
    from metis_hf.workflows.compare_training import Run, RunTraining

    def recipe(training, method_params=None, variants=None):
        tasks = [{"name": n} for n in ("a", "b", "c", "d")]
        methods = ["metis_robust", "task_arithmetic", "metis", *(variants or {})]
        compare = {
            "many_shot_methods": methods,
            "method_params": method_params or {},
            "variants": variants or {},
        }
        return parse(Recipe, {"tasks": tasks, "training": training, "compare": compare})

    erased = {"merge_method": "metis_robust", "merge_params": {"gap_normalization": "erased", "delta": 0.3}}
    # delta 0.3 is metis_robust's own default: only the gap normalization changes the merge
    assert compare_merge_spec(recipe(erased), "metis_robust") == MergeSpec(
        "metis_robust", {"gap_normalization": "erased"}
    )
    args = RunTraining(recipe(erased), {}, tmp_path).args(tmp_path, Run("many_shot", 0, "metis_robust"))
    assert args.merge_params["gap_normalization"] == "erased"  # what the grid's run trains with
    stated = {
        "metis_robust": {"gap_normalization": "standardized", "floor": 0.1}
    }  # another setting, on purpose
    assert compare_merge_spec(recipe(erased, stated), "metis_robust").params == stated["metis_robust"]
    assert compare_merge_spec(recipe(erased), "task_arithmetic").params == {}  # not the training method
    variant = {"r@plain": {"method": "metis_robust"}}  # a variant states its whole setting
    assert compare_merge_spec(recipe(erased, variants=variant), "r@plain").params == {}
    # the paper's METIS settings are metis's defaults; a summing method's scale defaults to 1/T
    paper = {"merge_method": "metis", "merge_params": {"temperature": 2.0, "delta": 0.3, "k": 2, "beta": 1.0}}
    assert compare_merge_spec(recipe(paper), "metis").params == {}
    quarter = {"merge_method": "task_arithmetic", "merge_params": {"scale": 0.25}}
    assert compare_merge_spec(recipe(quarter), "task_arithmetic").params == {}
    half = {"merge_method": "task_arithmetic", "merge_params": {"scale": 0.5}}
    assert compare_merge_spec(recipe(half), "task_arithmetic").params == {"scale": 0.5}
    per_round = {"merge_method": "metis", "num_rounds": 2, "merge_params": {"temperature": [2.0, 1.0]}}
    assert compare_merge_spec(recipe(per_round), "metis").params == {"temperature": [2.0, 1.0]}
