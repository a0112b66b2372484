"""Retention scoring speed: log-likelihoods of every choice as metis-hf computes them (16 items a
batch, each prompt run once and its key/value cache shared by its choices) against the plain way
(per item, one padded batch of prompt + choice per choice, logits at every position), same model,
same items, same process. Checks that both pick the same choice on every item.

    python benchmarks/retention_scoring.py --task date_understanding --items 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from metis_hf.evaluation.retention import (
    batch_choice_log_likelihoods,
    bigbench_task_file,
    load_multiple_choice,
)
from metis_hf.models import load_model_and_tokenizer


@torch.no_grad()
def every_position_log_likelihoods(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """The reference: logits and log-softmax at every position of the padded batch."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = [prompt_ids + tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    log_probs = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1], dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    return [float(picked[row, len(prompt_ids) - 1 : len(s) - 1].sum()) for row, s in enumerate(sequences)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="date_understanding")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    items = load_multiple_choice(bigbench_task_file(args.task), size=args.items)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()

    def plain(batch: list[dict]) -> list[list[float]]:
        return [
            every_position_log_likelihoods(model, tokenizer, item["prompt"], item["choices"])
            for item in batch
        ]

    def metis_hf(batch: list[dict]) -> list[list[float]]:
        return batch_choice_log_likelihoods(model, tokenizer, batch)

    timings, picks = {}, {}
    for name, score in [("every position", plain), ("metis-hf", metis_hf)]:
        score(items[:16])  # warm-up
        start = time.perf_counter()
        results = [scores for i in range(0, len(items), 16) for scores in score(items[i : i + 16])]
        timings[name] = time.perf_counter() - start
        picks[name] = [max(range(len(r)), key=r.__getitem__) for r in results]
    same = sum(a == b for a, b in zip(picks["every position"], picks["metis-hf"]))
    print(
        f"| {args.task}, {len(items)} items | every position {timings['every position']:.1f} s | "
        f"metis-hf {timings['metis-hf']:.1f} s | "
        f"{timings['every position'] / timings['metis-hf']:.2f}x | same choice on {same}/{len(items)} |"
    )


if __name__ == "__main__":
    main()
