"""Dress rehearsal of the paper recipes: `metis-hf compare` end to end on each of the four, with
only what needs the Hub or a GPU substituted, through `--set` overrides a user could type: a tiny
local model for the base, the schema fixtures for the Hub datasets (same adapters and mixture
weights), local harness tasks of the same output type and metric key for the lm-eval tasks, and a
CPU-sized schedule. Every other setting (methods and their parameters, metric, LoRA targets) is the
recipe's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metis_hf.commands import main
from metis_hf.recipe import load_recipe
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
FIXTURES = ROOT / "tests" / "fixtures" / "paper_datasets"

UTILS = """
def strict_following(doc, results):
    return {"prompt_level_strict_acc": float(doc["keyword"] in results[0])}


def answer_f1(doc, results):
    predicted, gold = results[0].split(), doc["answer"].split()
    common = sum(min(predicted.count(w), gold.count(w)) for w in set(gold))
    if not common:
        return {"f1": 0.0}
    precision, recall = common / len(predicted), common / len(gold)
    return {"f1": 2 * precision * recall / (precision + recall)}
"""

GENERATE = (
    "output_type: generate_until\n"
    "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
)
CHOICE = "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"

# name -> (the lm-eval task it stands in for, YAML body, documents)
HARNESS_TASKS = {
    "rehearsal_ifeval": (
        "ifeval",
        GENERATE
        + "doc_to_text: '{{prompt}}'\ndoc_to_target: ''\nprocess_results: !function utils.strict_following\n"
        "metric_list:\n  - metric: prompt_level_strict_acc\n    aggregation: mean\n    higher_is_better: true\n",
        [{"prompt": f"Write a word with the letter {c}.", "keyword": c} for c in "aeiou"],
    ),
    "rehearsal_gsm8k_cot": (
        "gsm8k_cot",
        GENERATE + "doc_to_text: 'Q: {{question}}\\nA:'\ndoc_to_target: 'The answer is {{answer}}.'\n"
        "filter_list:\n  - name: strict-match\n    filter:\n"
        "      - function: regex\n        regex_pattern: 'The answer is (\\-?[0-9\\.\\,]+).'\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        [{"question": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(1, 6)],
    ),
    "rehearsal_mmlu": (
        "m_mmlu_fr",
        CHOICE + "doc_to_text: '{{question}}\\nAnswer:'\nmetric_list:\n  - metric: acc\n",
        [
            {
                "question": f"Quelle est la couleur numéro {i}?",
                "choices": ["rouge", "vert", "bleu"],
                "label": i % 3,
            }
            for i in range(5)
        ],
    ),
    "rehearsal_arc": (
        "arc_fr",
        CHOICE
        + "doc_to_text: 'Question: {{question}}\\nAnswer:'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        [
            {"question": f"Combien font {i} et {i}?", "choices": [str(2 * i), str(i), "0"], "label": 0}
            for i in range(5)
        ],
    ),
    "rehearsal_hellaswag": (
        "hellaswag_fr",
        CHOICE + "doc_to_text: '{{question}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        [
            {"question": f"Le chat numéro {i}", "choices": ["dort.", "vole.", "nage."], "label": 0}
            for i in range(5)
        ],
    ),
    "rehearsal_coqa": (
        "coqa",
        GENERATE + "doc_to_text: '{{story}}\\nQ: {{question}}\\nA:'\ndoc_to_target: '{{answer}}'\n"
        "process_results: !function utils.answer_f1\n"
        "metric_list:\n  - metric: f1\n    aggregation: mean\n    higher_is_better: true\n",
        [{"story": f"Ann has {i} cats.", "question": "How many cats?", "answer": str(i)} for i in range(5)],
    ),
    "rehearsal_pubmedqa": (
        "pubmedqa",
        CHOICE + "doc_to_text: 'Abstract: {{question}}\\nAnswer:'\nmetric_list:\n  - metric: acc\n",
        [
            {"question": f"Does drug {i} help?", "choices": ["yes", "no", "maybe"], "label": i % 3}
            for i in range(5)
        ],
    ),
}


def write_harness_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "utils.py").write_text(UTILS)
    for name, (_, body, docs) in HARNESS_TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


def rehearsal_overrides(model_dir: Path, harness_dir: Path) -> list[str]:
    """What replaces the Hub, lm-eval's datasets and the GPU: the `--set` lines of docs/reproduce.md."""
    datasets = [
        "tulu-3-sft-personas-instruction-following.jsonl",
        "NuminaMath-TIR.jsonl",
        "aya_dataset.jsonl",
    ]
    sets = [f"model={model_dir}"]
    for index, name in enumerate(datasets):
        sets += [f"tasks.{index}.source=file", f"tasks.{index}.dataset={FIXTURES / name}"]
    sets += [
        "tasks.3.source=file",
        f"tasks.3.mixture.0.dataset={FIXTURES / 'wildguardmix-wildguardtrain.jsonl'}",
        "tasks.3.mixture.0.config_name=null",
        f"tasks.3.mixture.1.dataset={FIXTURES / 'wildjailbreak-train.jsonl'}",
        "tasks.3.mixture.1.config_name=null",
        "tasks.3.mixture.1.load_kwargs={}",  # the Hub file is a TSV; the fixture is JSON lines
    ]
    for index in range(4):
        sets += [
            f"tasks.{index}.train_size=4",
            f"tasks.{index}.validation_size=2",
            f"tasks.{index}.test_size=2",
        ]
    sets += [
        f"evaluation.harness_include={harness_dir}",
        "evaluation.harness_limit=3",
        "evaluation.harness_batch_size=3",
        "evaluation.harness.0.tasks=[rehearsal_ifeval]",
        "evaluation.harness.1.tasks=[rehearsal_gsm8k_cot]",
        "evaluation.harness.1.num_fewshot=1",
        "evaluation.harness.2.tasks=[rehearsal_mmlu]",
        "evaluation.harness.3.tasks=[rehearsal_arc]",
        "evaluation.harness.4.tasks=[rehearsal_hellaswag]",
        "evaluation.retention.0.harness=[rehearsal_coqa]",
        "evaluation.retention.0.size=3",
        "evaluation.retention.1.harness=[rehearsal_pubmedqa]",
        "evaluation.retention.1.size=3",
        "training.num_rounds=2",
        "training.local_steps=1",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.max_length=64",
        "training.fp16=false",
        "training.bf16=false",
        "training.use_cpu=true",
        "compare.seeds=[0]",
    ]
    return sets


@pytest.fixture(scope="module")
def rehearsal_inputs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("rehearsal")
    model_dir = root / "tiny"
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return root, model_dir, write_harness_tasks(root / "harness")


def test_the_stand_ins_match_the_real_tasks_output_type_and_metric():
    """Each local harness task reports the metric key the recipes read from the lm-eval task it
    stands in for, with the same output type."""
    import yaml

    from metis_hf.evaluation.harness import task_manager

    manager = task_manager()
    for name, (real, body, _) in HARNESS_TASKS.items():
        config = manager.task_index[real].cfg
        ours = yaml.safe_load(body.replace("!function ", ""))
        assert ours["output_type"] == config["output_type"], name
        assert {m["metric"] for m in ours["metric_list"]} <= {m["metric"] for m in config["metric_list"]}, (
            name
        )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_dress_rehearsal(recipe, rehearsal_inputs, capsys):
    root, model_dir, harness_dir = rehearsal_inputs
    out = root / recipe.stem
    overrides = rehearsal_overrides(model_dir, harness_dir)
    assert (
        main(
            [
                "compare",
                str(recipe),
                "--output-dir",
                str(out),
                "--no-plots",
                *[f"--set={o}" for o in overrides],
            ]
        )
        == 0
    )
    spec = load_recipe(recipe).compare
    report = json.loads((out / "results.json").read_text())
    columns = ["IFEval", "GSM8K", "M-MMLU", "M-ARC", "M-HellaSwag"]  # safety (XSTest) is not harness-scored
    assert report["tasks"] == columns and report["metric"] == spec.metric
    expected = {f"post_hoc/{m}" for m in spec.post_hoc_methods} | {
        f"many_shot/{m}" for m in spec.many_shot_methods
    }
    assert expected <= set(report["aggregate"]) and "reference/multi-task SFT" in report["aggregate"]
    for key in expected:
        summary = report["summaries"][key]["0"]
        assert set(summary["normalized"]) == set(columns)
        defined = [v for v in summary["normalized"].values() if v == v]
        if defined:  # Avg: instruction + math + the three multilingual scores, each once, over 5
            assert summary["average"] == pytest.approx(sum(defined) / len(defined))
            assert summary["worst"] == min(defined) and summary["gap"] == pytest.approx(
                min(defined) - summary["average"]
            )
    markdown = (out / "results.md").read_text()
    header = "| method | " + " | ".join(columns) + " | Avg | Worst | Gap | MT loss |"
    assert header in markdown and "| **Post-hoc** |" in markdown and "| **Many-shot** |" in markdown
    assert "### Knowledge retention" in markdown and "| CoQA | PubMedQA | mean |" in markdown
    assert (out / "README.md").is_file() and "metis" in (out / "README.md").read_text()
    for key in expected:  # the mean over the retention tasks the base scored above 0
        retention = report["summaries"][key]["0"]["retention"]
        defined = [v for name, v in retention.items() if name != "mean" and v == v]
        assert (
            retention["mean"] == pytest.approx(sum(defined) / len(defined))
            if defined
            else retention["mean"] != 0
        )
    for run in (out / "runs" / "seed0").iterdir():
        result = json.loads((run / "result.json").read_text())
        if result["kind"] != "experts":
            assert set(result["retention"]) == {"CoQA", "PubMedQA"}
