"""What returning a dense-space merge to a rank-r LoRA adapter loses, on trained adapters.

Trains one LoRA adapter per task on SmolLM2-135M-Instruct (post-hoc protocol, STEPS steps each),
keeps the trained adapters, merges their dense deltas (scaling * B @ A per module) with each method,
and reports the share of the merged delta's Frobenius norm that truncating to rank r drops
(``dense_to_lora``), overall and for the worst module.

    python scripts/dense_truncation.py --steps 30
"""

from __future__ import annotations

import argparse

from metis_hf.merging.task_vectors import dense_to_lora, lora_state, lora_to_dense, merge_state_dicts

TASKS = ["chain_sum", "family_relationships", "spell_backward", "letter_counting"]
METHODS = {
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.2},
    "consensus_ta": {"k": 2},
    "metis": {"alphas": [0.25] * 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="/tmp/metis-hf-dense")
    args = parser.parse_args()

    from _shared import independent_adapters_trainer

    from metis_hf.data import build_tasks
    from metis_hf.models import load_model_and_tokenizer

    tasks = build_tasks([{"name": t, "train_size": 400, "validation_size": 8, "test_size": 1} for t in TASKS])
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    trainer = independent_adapters_trainer(model, tokenizer, tasks, args.steps, args.out)
    trained = {}
    end_round = trainer.rounds.end_round

    def capture(round_index: int) -> None:  # keep the trained adapters before the merge overwrites them
        trained.update({t: lora_state(trainer.peft_model, t) for t in TASKS})
        end_round(round_index)

    trainer.rounds.end_round = capture
    trainer.train()
    lora = trainer.peft_model.peft_config["default"]
    scaling = lora.lora_alpha / lora.r
    dense = [lora_to_dense(trained[t], scaling) for t in TASKS]
    print(f"{len(TASKS)} adapters (r={lora.r}, {args.steps} steps each), {len(dense[0])} modules\n")
    print("| dense merge | relative error, all modules | worst module |")
    print("|---|---|---|")
    _, single = dense_to_lora(dense[0], lora.r, scaling)
    print(
        f"| one task's own delta (control) | {single.overall:.2e} | {max(single.relative_error.values()):.2e} |"
    )
    for method, params in METHODS.items():
        merged = merge_state_dicts(method, dense, **params)
        _, report = dense_to_lora(merged, lora.r, scaling)
        print(f"| {method} | {report.overall:.3f} | {max(report.relative_error.values()):.3f} |")


if __name__ == "__main__":
    main()
