"""RoundPlan on its own: step counts, orders, learning-rate factors and the rows each task reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from metis_hf.training.config import MetisConfig
from metis_hf.training.plan import ALL_TASKS, RoundPlan
from metis_hf.training.trainer import make_round_plan


def test_sequential_and_interleaved_orders_and_round_ends():
    sequential = RoundPlan(["a", "b", "c"], [2, 3, 1], rounds=2)
    assert [s.task for s in sequential.steps] == [0, 0, 1, 1, 1, 2] * 2
    assert sequential.round_ends == [6, 12] and sequential.total_steps == 12
    interleaved = RoundPlan(["a", "b", "c"], [2, 3, 1], rounds=2, schedule="interleaved")
    # one step per task in turn, finished tasks skipped
    assert [s.task for s in interleaved.steps] == [0, 1, 2, 0, 1, 1] * 2
    assert [(s.round, s.local_index) for s in interleaved.steps[:6]] == [
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 1),
        (0, 1),
        (0, 2),
    ]
    assert interleaved.round_ends == [6, 12]


def test_parallel_steps_train_every_task_and_need_equal_steps():
    plan = RoundPlan(["a", "b"], [3, 3], rounds=2, schedule="parallel")
    assert [s.task for s in plan.steps] == [ALL_TASKS] * 6 and plan.round_ends == [3, 6]
    with pytest.raises(ValueError, match="tasks need equal steps per round"):
        RoundPlan(["a", "b"], [3, 2], rounds=1, schedule="parallel")


def test_learning_rate_decays_to_zero_within_each_tasks_round():
    plan = RoundPlan(["a", "b"], [4, 2], rounds=2)
    factors = [plan.lr_factor(step, "linear") for step in range(plan.total_steps)]
    assert factors == [1.0, 0.75, 0.5, 0.25, 1.0, 0.5] * 2
    assert {plan.lr_factor(step, "constant") for step in range(plan.total_steps)} == {1.0}
    # across rounds: task a's 8 steps decay as one (1, 7/8, ... 1/8), task b's 4 steps likewise
    across = [plan.lr_factor(step, "linear_across_rounds") for step in range(plan.total_steps)]
    assert across == [1.0, 0.875, 0.75, 0.625, 1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.5, 0.25]


def test_each_task_reads_only_its_rows_in_a_fresh_seeded_permutation_each_round():
    ranges = [range(0, 5), range(5, 12)]
    plan = RoundPlan(["a", "b"], [3, 2], rounds=2)
    order = plan.example_order(ranges, rows=2, micro_batches=1, seed=7)
    assert len(order) == 2 * (3 + 2) * 2  # rounds x steps x rows
    per_step = [order[i : i + 2] for i in range(0, len(order), 2)]
    for step, rows in zip(plan.steps, per_step):
        assert set(rows) <= set(ranges[step.task])
    a_round_1, a_round_2 = order[0:6], order[10:16]
    # 6 rows from 5 examples: one whole permutation, then the next one starts
    assert sorted(a_round_1[:5]) == list(range(5)) and a_round_1[5] in ranges[0]
    assert a_round_1 != a_round_2  # another permutation in the next round
    assert plan.example_order(ranges, 2, 1, seed=7) == order
    assert plan.example_order(ranges, 2, 1, seed=8) != order


def test_parallel_micro_batches_hold_every_tasks_rows_in_task_blocks():
    ranges = [range(0, 8), range(8, 16)]
    sequential = RoundPlan(["a", "b"], [2, 2], rounds=1).example_order(
        ranges, rows=2, micro_batches=2, seed=1
    )
    parallel = RoundPlan(["a", "b"], [2, 2], rounds=1, schedule="parallel").example_order(
        ranges, rows=2, micro_batches=2, seed=1
    )
    # a parallel micro-batch: task a's 2 rows then task b's 2 rows, the same rows the other schedule gives
    first = parallel[0:4]
    assert set(first[:2]) <= set(ranges[0]) and set(first[2:]) <= set(ranges[1])
    a_rows = [i for i in parallel if i in ranges[0]]
    b_rows = [i for i in parallel if i in ranges[1]]
    assert a_rows == sequential[:8] and b_rows == sequential[8:]


@pytest.mark.parametrize(
    "fields,sizes,expected",
    [
        (dict(local_steps=3), [10, 50], [3, 3]),
        (dict(local_epochs=1.0), [10, 50], [math.ceil(10 / 8), math.ceil(50 / 8)]),  # 2 rows x 4 accumulation
        (dict(local_epochs=0.5), [10, 50], [1, math.ceil(25 / 8)]),
        (dict(local_epochs=2.0, protocol="post_hoc", num_rounds=3), [16, 8], [3 * 4, 3 * 2]),
    ],
)
def test_step_counts_from_local_steps_and_local_epochs(tmp_path, fields, sizes, expected):
    args = MetisConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        **fields,
    )
    plan = make_round_plan(args, ["a", "b"], sizes, rows_per_task=2)
    assert plan.steps_per_task == expected
    assert plan.rounds == (1 if args.protocol == "post_hoc" else args.num_rounds)


def _round_params(args, method, gaps, rounds):
    from metis_hf.training.rounds import merge_parameters

    return [
        merge_parameters(args, method, list(gaps), r, gaps, dict.fromkeys(gaps, 2.0)) for r in range(rounds)
    ]


def test_per_round_lists(tmp_path):
    args = MetisConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        num_rounds=3,
        temperature=[4.0, 3.0, 1.0],  # the alias field
        beta=1.5,
        merge_params={"delta": [0.1, 0.2, 0.3]},  # any one-value parameter may take a list per round
    )
    assert args.merge_params == {"delta": [0.1, 0.2, 0.3], "temperature": [4.0, 3.0, 1.0], "beta": 1.5}
    gaps = {"a": 0.2, "b": 1.0}
    rounds = _round_params(args, "metis", gaps, 3)
    assert [p["temperature"] for p, _ in rounds] == [4.0, 3.0, 1.0]
    assert [p["delta"] for p, _ in rounds] == [0.1, 0.2, 0.3]
    assert [(p["beta"], p["k"], p["loss_gaps"]) for p, _ in rounds] == [(1.5, 2, [0.2, 1.0])] * 3
    for (_, alphas), temperature in zip(rounds, [4.0, 3.0, 1.0]):  # softmax(gaps / temperature)
        expected_b = 1 / (1 + math.exp(-0.8 / temperature))
        assert alphas == pytest.approx([1 - expected_b, expected_b])


def test_the_alias_fields_feed_every_method_that_takes_them(tmp_path):
    from metis_hf.merging import robust_weights

    # metis_robust's temperature is set the same way as metis's (the field was once ignored for it).
    args = MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="metis_robust", temperature=0.05)
    gaps = {"a": 0.1, "b": 0.3, "c": 0.2}
    ((params, alphas),) = _round_params(args, "metis_robust", gaps, 1)
    assert params["temperature"] == 0.05 and params["reference_losses"] == [2.0, 2.0, 2.0]
    assert alphas == robust_weights([0.1, 0.3, 0.2], [2.0] * 3, temperature=0.05)
    assert alphas != robust_weights([0.1, 0.3, 0.2], [2.0] * 3)  # the default (0.1) gives others
    with pytest.raises(ValueError, match="temperature: 'ties' has no parameter 'temperature'"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, merge_method="ties", temperature=2.0)
    with pytest.raises(ValueError, match="delta is set twice"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, delta=0.2, merge_params={"delta": 0.3})
    with pytest.raises(ValueError, match="delta has 2 values for 3 rounds"):
        MetisConfig(output_dir=str(tmp_path), use_cpu=True, num_rounds=3, merge_params={"delta": [0.1, 0.2]})
    # A default k above the task count is capped; a k the user gives is not.
    ((params, _),) = _round_params(
        MetisConfig(output_dir=str(tmp_path), use_cpu=True), "metis", {"a": 0.0}, 1
    )
    assert params["k"] == 1


# --- metis-hf plan ----------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_plans(path, capsys):
    from metis_hf.commands import main

    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "plan: OK" in out and "peak memory estimate" in out


def test_parameter_counts_match_the_model_and_peft(tiny_tokenizer):
    """The shape's parameter count against the tiny Llama's own (norms aside), and the LoRA count
    against PEFT's trainable parameters for the same targets and rank."""
    from peft import LoraConfig, get_peft_model

    from metis_hf.workflows.plan import ModelShape
    from tests.conftest import make_tiny_model

    model = make_tiny_model(len(tiny_tokenizer))
    shape = ModelShape.from_config(model.config.to_dict(), "tiny")
    counted = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name)
    assert shape.parameters() == counted
    targets = ["q_proj", "k_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shapes = shape.module_shapes()
    assert shape.layers * sum(4 * sum(shapes[m]) for m in targets) == trainable


def test_plan_counts_and_memory_by_hand():
    """The all-token offline CPU recipe: 4 tasks x 15 steps x 3 rounds; 8 sequences a step; validation
    (2 R + 1) x 4 x 24; SmolLM2-135M's LoRA on q/k/v/o at r 16: 30 x 16 x (1152 + 768 + 768 + 1152)."""
    from metis_hf.recipe import load_recipe
    from metis_hf.workflows.plan import plan_recipe

    plan = plan_recipe(
        load_recipe(RECIPES[0].parent.parent / "offline" / "cpu-4tasks-all-tokens.yaml"), sequence_length=100
    )
    assert plan["optimizer_steps"] == 180 and plan["sequences_per_step"] == 8
    assert plan["training_sequences"] == 1440 and plan["validation_sequences"] == 7 * 4 * 24
    lora = 30 * 16 * (1152 + 768 + 768 + 1152)
    assert plan["lora_parameters_per_adapter"] == lora
    assert (
        plan["memory_bytes"]["adapters"] == 5 * lora * 4 and plan["memory_bytes"]["optimizer"] == 2 * lora * 4
    )
    # fp32 activations: 8 rows x 100 tokens x 30 layers x (6 x 576 + 2 x 192 + 4 x 1536) x 4 bytes
    assert plan["memory_bytes"]["activations"] == 8 * 100 * 30 * (6 * 576 + 2 * 192 + 4 * 1536) * 4


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides,code,message",
    [
        (["model=not a model"], 2, "model 'not a model': no such folder, and not a Hub id"),
        (
            ["tasks.0.source=hub", "tasks.0.dataset=not a dataset"],
            1,
            "problem: tasks[0]: dataset 'not a dataset' is neither a local path nor a Hub id",
        ),
        (
            ["lora.target_modules=[q_proj,attn]"],
            1,
            "problem: lora.target_modules: ['attn'] are not projections",
        ),
        (["training.merge_params.delta=-1"], 2, "delta"),
    ],
)
def test_plan_names_what_would_fail(overrides, code, message, capsys):
    from metis_hf.commands import main

    path = RECIPES[0].parent.parent / "offline" / "cpu-4tasks-all-tokens.yaml"
    assert main(["plan", str(path), *[f"--set={o}" for o in overrides]]) == code
    captured = capsys.readouterr()
    assert message in (captured.out if code == 1 else captured.err)


@pytest.mark.parametrize(
    ("method", "count", "params", "space", "warned"),
    [
        # an entry every task shares survives TALL's mask while 1 >= delta (T - 1): T <= 4 at 0.3
        ("consensus_ta", 4, {}, "lora", False),
        ("consensus_ta", 5, {}, "lora", True),
        ("metis", 8, {}, "lora", True),
        ("consensus_ta", 8, {"delta": 0.1}, "lora", False),  # 0.1 * 7 <= 1
        ("consensus_ta", 8, {}, "dense", False),  # dense updates share no start
        ("metis_robust", 8, {}, "lora", False),
        ("ties", 8, {}, "lora", False),  # trims, but keeps the largest shared entries
        ("task_arithmetic", 8, {}, "lora", False),
    ],
)
def test_a_merge_that_zeroes_what_every_task_shares_is_warned_about(
    tmp_path, caplog, method, count, params, space, warned
):
    from metis_hf.logs import warn_once
    from metis_hf.training import rounds

    warn_once.cache_clear()  # said once a process: start afresh
    args = MetisConfig(
        output_dir=str(tmp_path), use_cpu=True, merge_method=method, merge_params=params, merge_space=space
    )
    tasks = [f"task{i}" for i in range(count)]
    with caplog.at_level("WARNING", logger="metis_hf.training.rounds"):
        rounds.check_merge_settings(args, tasks)
        assert ("zeroes every entry that all tasks share" in caplog.text) == warned
        caplog.clear()
        rounds.check_merge_settings(args, tasks)  # the trainer checks what `metis-hf train` checked: once
        assert "zeroes every entry" not in caplog.text


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate=-1", "learning_rate must be > 0, got -1"),
        ("training.learning_rate=.nan", "learning_rate must be a finite number, got nan"),
        ("lora.r=0", "lora.r must be an integer >= 1, got 0"),
        ("lora.lora_dropout=2", "lora.lora_dropout must be in [0, 1), got 2"),
        ("lora.lora_alpha=0", "lora.lora_alpha must be a positive number, got 0"),
        (
            "training.gradient_accumulation_steps=0",
            "gradient_accumulation_steps must be an integer >= 1, got 0",
        ),
        (
            "training.per_device_train_batch_size=0",
            "per_device_train_batch_size must be an integer >= 1, got 0",
        ),
        ("training.max_length=0", "max_length must be at least 2 tokens"),
        ("training.max_length=-5", "max_length must be at least 2 tokens"),
        ("training.num_rounds=1000000000", "num_rounds must be at most 10,000, got 1,000,000,000"),
        ("training.local_steps=100000000", "local_steps must be from 1 to 1,000,000"),
    ],
)
def test_plan_refuses_what_train_would_reject_before_loading_a_model(override, message, capsys, monkeypatch):
    from metis_hf.commands import main

    def no_model(*args, **kwargs):
        raise AssertionError("plan loaded a model")

    monkeypatch.setattr("metis_hf.models.load_model_and_tokenizer", no_model)
    path = RECIPES[0].parent.parent / "offline" / "cpu-4tasks.yaml"
    assert main(["plan", str(path), f"--set={override}"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.bad_input
def test_plan_refuses_tasks_that_do_not_split_between_task_parallel_processes(capsys):
    from metis_hf.commands import main

    path = RECIPES[0].parent.parent / "offline" / "cpu-3tasks.yaml"
    task_parallel = "--set=training.task_schedule=task_parallel"
    assert main(["plan", str(path), task_parallel, "--num-processes", "3"]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), task_parallel, "--num-processes", "2"]) == 2
    error = capsys.readouterr().err
    assert "training.task_schedule: task_schedule='task_parallel' splits the tasks evenly" in error
    assert "3 tasks cannot be split between 2 processes" in error


@pytest.mark.bad_input
def test_plan_refuses_a_max_length_that_cuts_every_answer_away(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    from metis_hf.commands import main
    from tests.conftest import write_tiny_recipe

    def no_model(*args, **kwargs):
        raise AssertionError("plan loaded a model")

    monkeypatch.setattr("metis_hf.models.load_model", no_model)
    recipe = write_tiny_recipe(tmp_path, tiny_tokenizer, training={"completion_only_loss": True})
    # a local-file task beside the generated ones: plan reads every split of a file
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(tmp_path / f"{split}.jsonl")
        rows = [{"prompt": f"Add {i} and {i}.\nAnswer:", "completion": f" {2 * i}\n\n"} for i in range(3)]
        Path(files[split]).write_text("\n".join(json.dumps(r) for r in rows))
    data = yaml.safe_load(recipe.read_text())
    data["tasks"].append(
        {
            "name": "sums",
            "source": "file",
            "data_files": files,
            "train_size": 3,
            "validation_size": 3,
            "test_size": 3,
        }
    )
    recipe.write_text(yaml.safe_dump(data))
    assert main(["plan", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["plan", str(recipe), "--set=training.max_length=4"]) == 1
    out = capsys.readouterr().out
    assert (
        "problem: tasks[0] (chain_sum) validation: no example has a completion token left within max_length=4"
        in out
    )
    assert "tasks[1] (gcd) validation: no example has a completion token left" in out
    assert "tasks[2] (sums) train: no example has a completion token left" in out
    assert "tasks[2] (sums) validation: no example has a completion token left" in out
    assert "(chain_sum) train" not in out  # a generated training split is not drawn (too slow)
    # All-token training keeps cut prompts; the answer-token loss gaps still need an answer.
    assert (
        main(
            [
                "plan",
                str(recipe),
                "--set=training.max_length=4",
                "--set=training.completion_only_loss=false",
                "--set=training.gap_tokens=completion",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "tasks[0] (chain_sum) validation: no example has a completion token left" in out
    assert " train: " not in out
