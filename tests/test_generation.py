import pytest
import torch

from metis_hf.data import Task
from metis_hf.evaluation import format_score_table, generate_answers, score_task


def _greedy_one(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids


def test_batched_left_padded_generation_matches_one_by_one(tiny_model, tiny_tokenizer):
    prompts = [
        "What is 2 + 3?\nAnswer:",
        "Spell this word backward: cat\nAnswer:",
        "Find\nAnswer:",
        "The quick brown fox",
    ]
    answers = generate_answers(tiny_model, tiny_tokenizer, prompts, batch_size=3, max_new_tokens=5)
    for prompt, answer in zip(prompts, answers):
        full = _greedy_one(tiny_model, tiny_tokenizer, prompt, 5)
        n = len(tiny_tokenizer(prompt).input_ids)
        expected = (
            tiny_tokenizer.decode(full[0, n:], skip_special_tokens=True).strip().split("\n\n")[0].strip()
        )
        assert answer == expected


def test_score_task_counts_exact_matches(tiny_model, tiny_tokenizer):
    from datasets import Dataset

    prompts = ["What is 2 + 3?\nAnswer:", "Find\nAnswer:"]
    predicted = generate_answers(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4)
    rows = [
        {"prompt": prompts[0], "completion": "", "answer": predicted[0], "entry": ""},
        {"prompt": prompts[1], "completion": "", "answer": predicted[1] + "zzz", "entry": ""},
    ]
    data = Dataset.from_list(rows)
    result = score_task(tiny_model, tiny_tokenizer, Task("t", data, data, data), max_new_tokens=4)
    assert result.exact_match == pytest.approx(0.5) and result.n == 2
    table = format_score_table({"base": {"t": result}})
    assert "| t | 0.500 | 0.500 |" in table


def test_empty_evaluation_set_is_an_error(tiny_model, tiny_tokenizer):
    from datasets import Dataset

    empty = Dataset.from_list([{"prompt": "a", "completion": "b", "answer": "b", "entry": ""}]).select([])
    with pytest.raises(ValueError, match="empty"):
        score_task(tiny_model, tiny_tokenizer, Task("t", empty, empty, empty))
