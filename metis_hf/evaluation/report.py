"""The compare report: normalized scores per run, their mean and spread over seeds with 95%
intervals over test items, paired differences with a paired test over seeds, a markdown table in
the paper's layout, radar plots and per-round curves.

Pure functions over the runs' ``result.json`` contents; nothing here trains or loads a model.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metis_hf.evaluation import uncertainty
from metis_hf.evaluation.combine import summarize
from metis_hf.files import write_json, write_text_atomic

if TYPE_CHECKING:
    from metis_hf.recipe import CompareSpec

BLOCKS = (("reference", "References"), ("post_hoc", "Post-hoc"), ("many_shot", "Many-shot"))
BASE_ROW, MULTITASK_ROW = "base model", "multi-task SFT"


def scored_runs(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs of the normalized tables: the base model once per seed that has experts (as a
    reference row), the multi-task SFT runs (reference rows), and every merged run."""
    experts = sorted(r["seed"] for r in results if r["kind"] == "experts")
    rows: list[Mapping[str, Any]] = []
    for r in results:
        if r["kind"] == "base":
            rows += [{**r, "kind": "reference", "method": BASE_ROW, "seed": seed} for seed in experts]
        elif r["kind"] == "multitask":
            rows.append({**r, "kind": "reference", "method": MULTITASK_ROW})
        elif r["kind"] in ("post_hoc", "many_shot"):
            rows.append(r)
    return rows


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd and count of the finite values (nan entries are runs that had no score)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "sd": sd, "n": len(finite)}


def run_losses(run: Mapping[str, Any]) -> dict[str, float]:
    """A run's validation loss per task; files written before ``losses`` existed kept each loss
    in its task's scores."""
    by_task = run.get("losses") or {t: s.get("loss") for t, s in run["scores"].items()}
    return {t: v for t, v in by_task.items() if v is not None}


def multitask_loss(run: Mapping[str, Any]) -> float:
    """The mean of a run's per-task validation losses."""
    losses = list(run_losses(run).values())
    return sum(losses) / len(losses) if losses else math.nan


def build_report(
    results: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    spec,
    most_common: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Summaries per run (normalized by the same seed's experts), aggregates over seeds, paired
    differences, whether each expert learned its task, and the markdown tables. ``most_common``:
    per task, its most common test answer (``answer``) and the scores of always giving it (a
    ``TaskScore``'s fields), the reference an expert that learned only the answer distribution
    reaches."""
    metric, weights = spec.metric, dict(spec.task_weights) or None
    experts = {r["seed"]: r for r in results if r["kind"] == "experts"}
    base = next((r for r in results if r["kind"] == "base"), None)
    merged_runs = [r for r in scored_runs(results) if r["seed"] in experts]
    per_run: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in merged_runs:
        expert_scores = {t: experts[r["seed"]]["scores"][t][metric] for t in tasks}
        summary = summarize({t: r["scores"][t][metric] for t in tasks}, expert_scores, weights)
        summary["multitask_loss"] = multitask_loss(r)
        summary["gain_kept"] = gain_kept(r, base, experts.get(r["seed"]), tasks, weights)
        summary["retention"] = retention_ratios(r, base)
        per_run.setdefault((r["kind"], r["method"]), {})[r["seed"]] = summary

    replicates = uncertainty.bootstrap_replicates(merged_runs, experts, tasks, metric, weights)

    def seed_mean(key: tuple[str, str], seeds: Sequence[int], field: str, column: int | None = None):
        """A statistic's bootstrap replicates, averaged over ``seeds`` (None without replicates)."""
        if replicates is None:
            return None
        rows = [replicates[(*key, s)][field] for s in seeds]
        return np.mean([r if column is None else r[:, column] for r in rows], axis=0)

    aggregate = {}
    for key, by_seed in per_run.items():
        runs = list(by_seed.values())
        aggregate[key] = {
            "normalized": {t: mean_sd([s["normalized"][t] for s in runs]) for t in tasks},
            **{f: mean_sd([s[f] for s in runs]) for f in ("average", "worst", "gap", "multitask_loss")},
            "gain_kept": {
                "tasks": {t: mean_sd([s["gain_kept"]["kept"][t] for s in runs]) for t in tasks},
                **{f: mean_sd([s["gain_kept"][f] for s in runs]) for f in ("average", "worst")},
            },
            "retention": {
                name: mean_sd([s["retention"].get(name, math.nan) for s in runs])
                for name in {n for s in runs for n in s["retention"]}
            },
        }
        if replicates is not None:
            seeds = list(by_seed)
            aggregate[key]["interval"] = {
                "normalized": {
                    t: uncertainty.interval(seed_mean(key, seeds, "normalized", i))
                    for i, t in enumerate(tasks)
                },
                **{f: uncertainty.interval(seed_mean(key, seeds, f)) for f in ("average", "worst")},
            }

    def paired(a: tuple[str, str], b: tuple[str, str]) -> dict[str, Any] | None:
        seeds = sorted(set(per_run.get(a, {})) & set(per_run.get(b, {})))
        if not seeds:
            return None
        out: dict[str, Any] = {"a": list(a), "b": list(b), "seeds": seeds}
        for field in ("average", "worst"):
            diffs = [per_run[a][s][field] - per_run[b][s][field] for s in seeds]
            out[field] = {
                "per_seed": diffs,
                **mean_sd(diffs),
                "wins": sum(d > 0 for d in diffs),
                "p_sign_flip": uncertainty.sign_flip_p(diffs),
            }
            if replicates is not None:
                low, high = uncertainty.interval(seed_mean(a, seeds, field) - seed_mean(b, seeds, field))
                out[field]["interval"] = [low, high]
                out[field]["verdict"] = uncertainty.verdict(low, high)
        diffs = [per_run[a][s]["gain_kept"]["average"] - per_run[b][s]["gain_kept"]["average"] for s in seeds]
        out["gain_kept_average"] = {"per_seed": diffs, **mean_sd(diffs)}
        return out

    pairs = [(("many_shot", m), ("post_hoc", m)) for m in sorted({m for _, m in per_run})]
    for reference in reference_runs(per_run, spec):
        pairs += [
            (reference, key) for key in sorted(per_run) if key not in (reference, ("reference", BASE_ROW))
        ]
    unique_pairs, seen = [], set()
    for a, b in pairs:  # many-shot metis vs post-hoc metis can come twice; keep one order of a pair
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            unique_pairs.append((a, b))
    comparisons = [c for c in (paired(a, b) for a, b in unique_pairs) if c]

    rounds = {}
    for key in (k for k in per_run if k[0] == "many_shot"):
        by_seed = [r["rounds"] for r in results if (r["kind"], r["method"]) == key and r.get("rounds")]
        if by_seed:
            rounds[f"{key[0]}/{key[1]}"] = round_summaries(by_seed)

    report = {
        "metric": metric,
        "tasks": list(tasks),
        "seeds": sorted(experts),
        "runs": list(results),
        "summaries": {f"{k}/{m}": {str(s): v for s, v in d.items()} for (k, m), d in per_run.items()},
        "aggregate": {f"{k}/{m}": v for (k, m), v in aggregate.items()},
        "paired_differences": comparisons,
        "rounds": rounds,
        "most_common_answers": dict(most_common or {}),
        "expert_checks": expert_checks(base, experts, tasks, metric, most_common),
    }
    report["markdown"] = render_markdown(report, base, experts)
    return report


def expert_checks(
    base: Mapping[str, Any] | None,
    experts: Mapping[int, Mapping[str, Any]],
    tasks: Sequence[str],
    metric: str,
    most_common: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per seed and task, whether the expert learned its task: its gain over the base model and
    over always giving the task's most common answer, each as (gain, low, high) with the 95%
    paired-bootstrap interval over the test items. Only tasks with per-item values for both."""
    if base is None:
        return []
    always = {"scores": most_common or {}}  # scored like a run: the same answer to every item
    before = {t: uncertainty.item_values(base, t, metric) for t in tasks}
    prior = {t: uncertainty.item_values(always, t, metric) for t in tasks}
    checks = []
    for seed, expert in sorted(experts.items()):
        after = {t: uncertainty.item_values(expert, t, metric) for t in tasks}
        scored = [t for t in tasks if after[t] is not None and before[t] is not None]
        over_base = uncertainty.paired_gains({t: before[t] for t in scored}, after)
        with_prior = [t for t in scored if prior[t] is not None]
        over_prior = uncertainty.paired_gains({t: prior[t] for t in with_prior}, after)
        for task in scored:
            check = {
                "seed": seed,
                "task": task,
                "base": float(before[task].mean()),
                "expert": float(after[task].mean()),
                "over_base": list(over_base[task]),
            }
            if task in with_prior:
                check["most_common_answer"] = always["scores"][task]["answer"]
                check["most_common"] = float(prior[task].mean())
                check["over_most_common"] = list(over_prior[task])
            checks.append(check)
    return checks


def answer_losses(run: Mapping[str, Any] | None) -> dict[str, float]:
    """A run's validation loss on the answer tokens per task (empty for files written before it
    was measured)."""
    return {t: v for t, v in ((run or {}).get("answer_losses") or {}).items() if v is not None}


def gain_kept(
    run: Mapping[str, Any],
    base: Mapping[str, Any] | None,
    expert: Mapping[str, Any] | None,
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per task, the share of the expert's answer-token loss gain that the merge keeps,
    ``(L_base - L_merged) / (L_base - L_expert)`` (1: the expert's gain, 0: the base's loss), with
    its average and worst task. Undefined (nan) where a loss is missing or the expert did not lower
    the base's loss."""
    merged, before, after = answer_losses(run), answer_losses(base), answer_losses(expert)
    kept = {}
    for task in tasks:
        if task in merged and task in before and task in after and before[task] > after[task]:
            kept[task] = (before[task] - merged[task]) / (before[task] - after[task])
        else:
            kept[task] = math.nan
    if all(math.isnan(v) for v in kept.values()):
        return {"kept": kept, "average": math.nan, "worst": math.nan}
    summary = summarize(kept, weights=weights)
    return {"kept": kept, "average": summary["average"], "worst": summary["worst"]}


def retention_ratios(run: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, float]:
    """Per retention task, the run's accuracy over the base model's (nan where the base scored 0),
    and the ``mean`` of the defined ones; empty when either was not scored on retention tasks."""
    mine, before = run.get("retention") or {}, (base or {}).get("retention") or {}
    ratios = {}
    for name in mine.keys() & before.keys():
        base_accuracy = before[name]["accuracy"]
        ratios[name] = mine[name]["accuracy"] / base_accuracy if base_accuracy > 0 else math.nan
    defined = [v for v in ratios.values() if not math.isnan(v)]
    if ratios:
        ratios["mean"] = statistics.fmean(defined) if defined else math.nan
    return ratios


def reference_runs(keys: Iterable[tuple[str, str]], spec: CompareSpec) -> list[tuple[str, str]]:
    """The runs compared with every other run: many-shot runs of the loss-gap methods (METIS and
    its kin), variants of them included (a variant names the method it runs), and those the spec's
    ``paired_with_every_run`` names."""
    from metis_hf.merging import available_methods, get_merge_method

    def uses_loss_gaps(name: str) -> bool:
        method = spec.resolve(name)[0]
        return method in available_methods() and get_merge_method(method).uses_loss_gaps

    chosen = set(spec.paired_with_every_run)
    return sorted(
        key for key in keys if key[0] == "many_shot" and (key[1] in chosen or uses_loss_gaps(key[1]))
    )


def round_summaries(by_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per round, over seeds: the mean mask density (the share of coordinates the merge kept; near
    0 means the merge collapsed), the mean multi-task validation loss, and the range of the merge
    weights alpha."""
    from metis_hf.round_record import RoundRecord

    out = []
    for index in range(min(len(rounds) for rounds in by_seed)):
        records = [RoundRecord.from_log(rounds[index]) for rounds in by_seed]
        alphas = [a for r in records for a in r.alphas.values()]
        densities = [r.mask_density for r in records]
        losses = [r.multitask_loss for r in records if r.multitask_loss is not None]
        out.append(
            {
                "round": records[0].round,
                "mask_density": mean_sd(densities),
                "multitask_loss": mean_sd(losses),
                "alpha_min": min(alphas, default=math.nan),
                "alpha_max": max(alphas, default=math.nan),
            }
        )
    return out


def mean_sd_cell(stats: Mapping[str, float], signed: bool = False) -> str:
    """A table cell "mean ± sd" for ``mean_sd``'s output (the sd left out for one value)."""
    if stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:+.3f}" if signed else f"{stats['mean']:.3f}"
    return text + (f" ± {stats['sd']:.3f}" if stats["n"] > 1 else "")


def table_header(columns: Sequence[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def interval_text(bounds: Sequence[float] | None) -> str:
    """The text " [low, high]" for an interval, "" when there is none."""
    if not bounds or any(math.isnan(b) for b in bounds):
        return ""
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def not_above(checks: Sequence[Mapping[str, Any]], field: str) -> str:
    """The experts whose gain ``field`` has an interval reaching 0, as "task (seeds 0, 2); ..."
    ("" when none)."""
    seeds: dict[str, list[str]] = {}
    for check in checks:
        if field in check and check[field][1] <= 0:
            seeds.setdefault(check["task"], []).append(str(check["seed"]))
    return "; ".join(f"{task} (seed{'s' * (len(s) > 1)} {', '.join(s)})" for task, s in seeds.items())


def expert_check_block(report: Mapping[str, Any]) -> list[str]:
    """The table of each expert against the base model and against always giving its task's most
    common answer, and which experts reach neither."""
    checks = report.get("expert_checks") or []
    if not checks:
        return []
    with_prior = any("over_most_common" in c for c in checks)
    columns = ["seed", "task", "base", "expert", "expert - base [95%]"]
    columns += ["most common answer: its score", "expert - it [95%]"] if with_prior else []
    lines = [
        "",
        f"### Do the experts learn their tasks? ({report['metric'].replace('_', ' ')} on the test items)",
        "",
        *table_header(columns),
    ]

    def gain(bounds: Sequence[float]) -> str:
        return f"{bounds[0]:+.3f} [{bounds[1]:+.3f}, {bounds[2]:+.3f}]"

    for check in checks:
        cells = [str(check["seed"]), check["task"], f"{check['base']:.3f}", f"{check['expert']:.3f}"]
        cells.append(gain(check["over_base"]))
        if "over_most_common" in check:
            answer = check["most_common_answer"].replace("|", "\\|")
            answer = answer if len(answer) <= 16 else answer[:15] + "…"
            cells += [f'"{answer}": {check["most_common"]:.3f}', gain(check["over_most_common"])]
        elif with_prior:
            cells += ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "[low, high]: 95% paired-bootstrap interval over the test items."]
    if below_base := not_above(checks, "over_base"):
        lines.append(
            f"Not above the base model: {below_base}. A merge's normalized score there is a ratio "
            "to what the base model already did."
        )
    if at_prior := not_above(checks, "over_most_common"):
        lines.append(
            f"Not above always giving the task's most common answer: {at_prior}. These experts do "
            "no better than one answer to every question (they may have learned the answers' "
            "distribution, not the task): a merge's normalized score there does not show that it "
            "kept the task."
        )
    return lines


def gain_kept_block(report: Mapping[str, Any], spread: str) -> list[str]:
    """The table of the share of each expert's answer-loss gain kept, per task with Avg and Worst
    (no lines when no run measured answer-token losses)."""
    tasks, aggregate = report["tasks"], report["aggregate"]
    if all(agg["gain_kept"]["average"]["n"] == 0 for agg in aggregate.values()):
        return []
    lines = [
        "",
        f"### Share of each expert's gain kept, on answer-token validation loss, {spread}",
        "",
        *table_header(["method", *tasks, "Avg", "Worst"]),
    ]
    for kind, title in BLOCKS:
        keys = [k for k in aggregate if k.startswith(kind + "/")]
        if keys:
            lines.append(f"| **{title}** |" + " |" * (len(tasks) + 2))
        for key in keys:
            kept = aggregate[key]["gain_kept"]
            cells = [mean_sd_cell(kept["tasks"][t]) for t in tasks]
            cells += [mean_sd_cell(kept[f]) for f in ("average", "worst")]
            lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(L_base - L_merged) / (L_base - L_expert) per task on the validation answer tokens: 1 keeps "
        "the expert's gain, 0 is the base model's loss. Continuous, so one test item does not move it.",
    ]
    return lines


def retention_block(report: Mapping[str, Any], base: Mapping[str, Any] | None, spread: str) -> list[str]:
    """The knowledge-retention table: accuracy on tasks outside the training set, merged / base."""
    scored = (base or {}).get("retention") or {}
    if not scored:
        return []
    names = [*scored, "mean"]
    lines = [
        "",
        f"### Knowledge retention: accuracy on tasks no expert trained on, merged / base, {spread}",
        "",
        *table_header(["method", *names]),
        "| base accuracy | " + " | ".join(f"{scored[n]['accuracy']:.3f}" for n in scored) + " | |",
    ]
    for kind, title in BLOCKS:
        for key in (
            k for k in report["aggregate"] if k.startswith(kind + "/") and k != f"reference/{BASE_ROW}"
        ):
            kept = report["aggregate"][key]["retention"]
            cells = [mean_sd_cell(kept[n]) if n in kept else "n/a" for n in names]
            lines.append(f"| {title} {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    lines += ["", "1.000: the base model's accuracy kept; below 1: what the merge cost there."]
    return lines


def render_markdown(report: Mapping[str, Any], base: Mapping | None, experts: Mapping[int, Mapping]) -> str:
    tasks, metric, seeds = report["tasks"], report["metric"], report["seeds"]
    spread = f"mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
    lines = [
        f"### Normalized {metric.replace('_', ' ')} (merged / expert per task), {spread}",
        "",
        *table_header(["method", *tasks, "Avg", "Worst", "Gap", "MT loss"]),
    ]
    for kind, title in BLOCKS:
        keys = [k for k in report["aggregate"] if k.startswith(kind + "/")]
        if not keys:
            continue
        lines.append(f"| **{title}** |" + " |" * (len(tasks) + 4))
        for key in keys:
            agg = report["aggregate"][key]
            intervals = agg.get("interval", {})
            cells = [
                mean_sd_cell(agg["normalized"][t]) + interval_text(intervals.get("normalized", {}).get(t))
                for t in tasks
            ]
            cells += [mean_sd_cell(agg[f]) + interval_text(intervals.get(f)) for f in ("average", "worst")]
            cells.append(mean_sd_cell(agg["gap"], signed=True))
            cells.append(mean_sd_cell(agg["multitask_loss"]))
            lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Avg: mean of the normalized scores; Worst: the lowest task (per seed, then averaged); "
        "Gap: Worst - Avg; MT loss: mean validation loss over tasks. "
        "[low, high]: 95% interval over the test items (paired bootstrap, "
        f"{uncertainty.REPLICATES} replicates); ± is the sd over seeds.",
        *(
            [
                "",
                "Caution: some experts are not above always giving their task's most common answer "
                "(see 'Do the experts learn their tasks?').",
            ]
            if not_above(report.get("expert_checks") or [], "over_most_common")
            else []
        ),
        *gain_kept_block(report, spread),
        *retention_block(report, base, spread),
        "",
        f"### Raw scores (score / exact match, mean over {len(seeds)} seed(s))",
        "",
        *table_header(["model", *tasks]),
    ]

    def raw(rows: Sequence[Mapping[str, Any]], task: str) -> str:
        score = statistics.fmean(r["scores"][task]["score"] for r in rows)
        exact = statistics.fmean(r["scores"][task]["exact_match"] for r in rows)
        return f"{score:.3f} / {exact:.3f}"

    if base is not None:
        lines.append("| base | " + " | ".join(raw([base], t) for t in tasks) + " |")
    most_common = report.get("most_common_answers") or {}
    if most_common:
        cells = [raw([{"scores": most_common}], t) if t in most_common else "n/a" for t in tasks]
        lines.append("| always its most common answer | " + " | ".join(cells) + " |")
    if experts:
        lines.append(
            "| expert (own task) | " + " | ".join(raw(list(experts.values()), t) for t in tasks) + " |"
        )
    scored = scored_runs(report["runs"])
    for kind, title in BLOCKS:
        for key in (
            k for k in report["aggregate"] if k.startswith(kind + "/") and k != f"reference/{BASE_ROW}"
        ):
            rows = [r for r in scored if f"{r['kind']}/{r['method']}" == key]
            lines.append(
                f"| {title} {key.split('/', 1)[1]} | " + " | ".join(raw(rows, t) for t in tasks) + " |"
            )
    lines += expert_check_block(report)
    if report.get("rounds"):
        lines += [
            "",
            "### Many-shot merges per round (mean ± sd over seeds)",
            "",
            "| method | round | mask density | MT val loss | alpha min - max |",
            "|---|---|---|---|---|",
        ]
        for key, rows in report["rounds"].items():
            for row in rows:
                lines.append(
                    f"| {key.split('/', 1)[1]} | {row['round']} | {mean_sd_cell(row['mask_density'])} | "
                    f"{mean_sd_cell(row['multitask_loss'])} | {row['alpha_min']:.3f} - {row['alpha_max']:.3f} |"
                )
        lines.append("")
        lines.append(
            "Mask density: the share of coordinates the merge kept (a collapsed merge is near 0); "
            "alpha: each task's merge weight (times the scale for summing methods)."
        )
    if report["paired_differences"]:
        lines += [
            "",
            "### Paired differences (A - B, same seed)",
            "",
            "| A | B | Δ Avg | Δ Worst | verdict (Avg, Worst) | A wins (Avg, Worst) | p (Avg, Worst) "
            "| Δ Avg per seed | Δ Avg gain kept |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        disagreements = []
        for c in report["paired_differences"]:
            per_seed = ", ".join(f"{d:+.3f}" for d in c["average"]["per_seed"])
            n = len(c["seeds"])
            cells = {
                f: mean_sd_cell(c[f], True) + interval_text(c[f].get("interval"))
                for f in ("average", "worst")
            }
            verdicts = ", ".join(c[f].get("verdict", "n/a") for f in ("average", "worst"))
            p_values = ", ".join(f"{c[f]['p_sign_flip']:.2f}" for f in ("average", "worst"))
            lines.append(
                f"| {' '.join(c['a'])} | {' '.join(c['b'])} | {cells['average']} | {cells['worst']} | {verdicts} | "
                f"{c['average']['wins']}/{n}, {c['worst']['wins']}/{n} | {p_values} | {per_seed} | "
                f"{mean_sd_cell(c['gain_kept_average'], True)} |"
            )
            exact, kept = c["average"]["mean"], c["gain_kept_average"]["mean"]
            if exact * kept < 0:  # nan compares False: no disagreement without both metrics
                disagreements.append(f"{' '.join(c['a'])} - {' '.join(c['b'])} ({exact:+.3f} / {kept:+.3f})")
        lines += [
            "",
            "Verdict: A or B when the 95% interval of the difference over test items excludes 0, "
            "else a tie. p: exact sign-flip test of the per-seed differences (two-sided; with n seeds "
            "it cannot go below 2/2^n). Δ Avg gain kept: the same difference on the share of the "
            "experts' answer-loss gain kept.",
        ]
        if disagreements:
            lines += [
                "",
                "The two metrics disagree in sign on Avg (exact / gain kept) for: "
                + "; ".join(disagreements)
                + ".",
            ]
    return "\n".join(lines)


# --- files and plots ---------------------------------------------------------------------------


def write_report(report: Mapping[str, Any], output_dir: str | Path, plots: bool = True) -> list[Path]:
    """results.json and results.md, and (with matplotlib) the radar and round-curve PNGs."""
    output_dir = Path(output_dir)
    write_json(output_dir / "results.json", {k: v for k, v in report.items() if k != "markdown"})
    write_text_atomic(output_dir / "results.md", report["markdown"] + "\n")
    written = [output_dir / "results.json", output_dir / "results.md"]
    if not plots:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'metis-hf[plots]'): no plots.", stacklevel=2)
        return written
    for kind, title in BLOCKS[1:]:  # the reference rows are drawn on both radars
        path = output_dir / f"radar_{kind}.png"
        if plot_radar(report, kind, f"{title}: normalized {report['metric'].replace('_', ' ')}", path):
            written.append(path)
    path = output_dir / "round_curves.png"
    if plot_round_curves(report, path):
        written.append(path)
    return written


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


def plot_radar(report: Mapping[str, Any], kind: str, title: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    keys = [k for k in report["aggregate"] if k.startswith(kind + "/")]
    references = [k for k in report["aggregate"] if k.startswith("reference/")]
    tasks = report["tasks"]
    if not keys or len(tasks) < 3:  # a radar needs three axes
        return False
    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for key in keys + references:
        values = [report["aggregate"][key]["normalized"][t]["mean"] for t in tasks]
        values = [0.0 if math.isnan(v) else v for v in values]
        style = (
            {"linestyle": "--", "color": "gray" if BASE_ROW in key else "black"} if key in references else {}
        )
        ax.plot(
            [*angles, angles[0]], [*values, values[0]], label=key.split("/", 1)[1], linewidth=1.5, **style
        )
        if key not in references:
            ax.fill([*angles, angles[0]], [*values, values[0]], alpha=0.08)
    ax.set_xticks(angles, tasks)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_round_curves(report: Mapping[str, Any], path: Path) -> bool:
    """Three panels over rounds: multi-task validation loss per many-shot method, METIS's alpha
    weights per task, and METIS's per-task validation loss (mean over seeds)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in report["runs"] if r["kind"] == "many_shot" and r.get("rounds")]
    if not runs:
        return False
    tasks = report["tasks"]

    from metis_hf.round_record import RoundRecord

    def mean_curve(rows: Sequence[Mapping[str, Any]], value: Callable[[RoundRecord], Any]) -> list[float]:
        """The mean over seeds of ``value(record)`` per round (nan where a record lacks it)."""
        records = [[RoundRecord.from_log(row) for row in r["rounds"]] for r in rows]
        count = min(len(seed) for seed in records)

        def number(record: RoundRecord) -> float:
            found = value(record)
            return math.nan if found is None else found

        return [statistics.fmean(number(seed[i]) for seed in records) for i in range(count)]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in sorted({r["method"] for r in runs}):
        rows = [r for r in runs if r["method"] == method]
        curve = mean_curve(rows, lambda r: r.multitask_loss)
        axes[0].plot(range(1, len(curve) + 1), curve, marker="o", label=method)
    axes[0].set(title="multi-task validation loss (merged)", xlabel="round", ylabel="loss")
    axes[0].legend(fontsize=8)
    metis = [r for r in runs if r["method"] == "metis"] or [runs[0]]
    for task in tasks:
        alpha = mean_curve(metis, lambda r, t=task: r.alphas.get(t))
        axes[1].plot(range(1, len(alpha) + 1), alpha, marker="o", label=task)
        loss = mean_curve(metis, lambda r, t=task: (r.val_loss_merged or {}).get(t))
        axes[2].plot(range(1, len(loss) + 1), loss, marker="o", label=task)
    axes[1].set(title=f"{metis[0]['method']}: merge weight per task", xlabel="round", ylabel="alpha")
    axes[2].set(title=f"{metis[0]['method']}: validation loss per task", xlabel="round", ylabel="loss")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
