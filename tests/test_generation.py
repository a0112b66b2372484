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
    assert result.item_exact_matches == [1.0, 0.0]  # in the items' order, for the report's bootstrap
    assert result.item_scores == [1.0, 0.0]  # no scorer: the score is exact match
    table = format_score_table({"base": {"t": result}})
    assert "| t | 0.500 | 0.500 |" in table


def test_score_task_warns_when_gold_answers_outgrow_the_generation_budget(tiny_model, tiny_tokenizer, caplog):
    """A gold answer longer than max_new_tokens can never match exactly (set C's number_sorting had
    30 of 200 at 25 tokens under a 24-token cap): the task and the count are named."""
    from datasets import Dataset

    long_answer = " ".join(["seven hundred and twelve"] * 10)  # 40 words: far more than 4 tokens
    rows = [
        {"prompt": "Find\nAnswer:", "completion": "", "answer": "7", "entry": ""},
        {"prompt": "Sort\nAnswer:", "completion": "", "answer": long_answer, "entry": ""},
    ]
    data = Dataset.from_list(rows)
    with caplog.at_level("WARNING", logger="metis_hf.evaluation.generation"):
        score_task(tiny_model, tiny_tokenizer, Task("sorting", data, data, data), max_new_tokens=4)
    assert "sorting: 1 of 2 gold answers are longer than max_new_tokens=4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="metis_hf.evaluation.generation"):  # the next model scored
        score_task(tiny_model, tiny_tokenizer, Task("sorting", data, data, data), max_new_tokens=4)
    assert "gold answers are longer" not in caplog.text  # said once, not once per model
    with caplog.at_level("WARNING", logger="metis_hf.evaluation.generation"):
        score_task(tiny_model, tiny_tokenizer, Task("sorting", data, data, data), max_new_tokens=200)
    assert "gold answers are longer" not in caplog.text


@pytest.mark.bad_input
def test_empty_evaluation_set_is_an_error(tiny_model, tiny_tokenizer):
    from datasets import Dataset

    empty = Dataset.from_list([{"prompt": "a", "completion": "b", "answer": "b", "entry": ""}]).select([])
    with pytest.raises(ValueError, match="empty"):
        score_task(tiny_model, tiny_tokenizer, Task("t", empty, empty, empty))


def _hand_example_losses(model, tokenizer, rows) -> dict[str, torch.Tensor]:
    """Each example's mean token loss on all tokens and on its completion, one example at a time
    (no padding, no batch masks): the reference the batched losses are checked against."""
    import torch.nn.functional as F

    from metis_hf.tokenization import tokenize_example

    losses: dict[str, list[torch.Tensor]] = {"all": [], "completion": []}
    for row in rows:
        enc = tokenize_example(tokenizer, row["prompt"], row["completion"])
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            token_losses = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        losses["all"].append(token_losses.mean())
        losses["completion"].append(token_losses[torch.tensor(enc["completion_mask"][1:]).bool()].mean())
    return {name: torch.stack(values) for name, values in losses.items()}


def test_task_loss_is_the_per_example_mean_of_token_losses(tiny_model, tiny_tokenizer):
    from datasets import Dataset

    from metis_hf.training.loss import task_loss

    rows = [
        {"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5\n\n"},
        {"prompt": "Find the GCD of 12 and 18.\nAnswer:", "completion": " 6\n\n"},
        {"prompt": "Spell this word backward: cat\nAnswer:", "completion": " tac\n\n"},
    ]
    data = Dataset.from_list(rows)
    expected = _hand_example_losses(tiny_model, tiny_tokenizer, rows)
    for completion_only in (False, True):
        got = task_loss(tiny_model, tiny_tokenizer, data, batch_size=2, completion_only=completion_only)
        reference = expected["completion" if completion_only else "all"]
        assert got == pytest.approx(float(reference.mean()), rel=1e-5)


def test_fused_and_logits_losses_agree(tiny_model, tiny_tokenizer):
    from datasets import Dataset
    from trl.trainer.utils import add_fused_lm_head

    from metis_hf.tokenization import tokenize_dataset
    from metis_hf.training.loss import per_example_losses

    rows = [
        {"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5\n\n"},
        {"prompt": "Find\nAnswer:", "completion": " 6 7 8\n\n"},
    ]
    tokenized = tokenize_dataset(tiny_tokenizer, Dataset.from_list(rows))
    for completion_only in (False, True):
        plain = per_example_losses(tiny_model, tokenized, batch_size=2, completion_only=completion_only)
        add_fused_lm_head(tiny_model)
        fused = per_example_losses(
            tiny_model, tokenized, batch_size=2, completion_only=completion_only, fused=True
        )
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_both_token_sets_from_one_forward(tiny_model, tiny_tokenizer):
    from datasets import Dataset
    from trl.trainer.utils import add_fused_lm_head

    from metis_hf.tokenization import tokenize_dataset
    from metis_hf.training.loss import per_example_losses_on

    rows = [
        {"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5\n\n"},
        {"prompt": "Find\nAnswer:", "completion": " 6 7 8\n\n"},
        {"prompt": "Spell this word backward: cat\nAnswer:", "completion": " tac\n\n"},
    ]
    expected = _hand_example_losses(tiny_model, tiny_tokenizer, rows)
    tokenized = tokenize_dataset(tiny_tokenizer, Dataset.from_list(rows))
    forwards = []
    hook = tiny_model.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        plain = per_example_losses_on(tiny_model, tokenized, ("all", "completion"), batch_size=2)
        add_fused_lm_head(tiny_model)
        fused = per_example_losses_on(tiny_model, tokenized, ("completion", "all"), batch_size=2, fused=True)
    finally:
        hook.remove()
    assert len(forwards) == 4  # two batches, each forwarded once per call
    for got in (plain, fused[::-1]):
        torch.testing.assert_close(got[0], expected["all"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], expected["completion"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="token_sets must be"):
        per_example_losses_on(tiny_model, tokenized, ("prompt",))


@pytest.mark.bad_input
@pytest.mark.parametrize("task_name, raising", [("prime_factorization", "3 = 18"), ("coin_flip", "1e999")])
def test_an_answer_whose_checker_raises_scores_zero_and_is_counted(task_name, raising, caplog):
    from metis_hf.data import build_tasks
    from metis_hf.evaluation.generation import score_answers

    task = build_tasks([{"name": task_name, "train_size": 4, "validation_size": 2, "test_size": 3}])[
        task_name
    ]
    rows = list(task.test)
    with pytest.raises((ValueError, OverflowError)):  # the checker itself raises on this answer
        task.score(raising, rows[0])
    answers = [raising, str(rows[1]["answer"]), raising]
    with caplog.at_level("WARNING"):
        result = score_answers(task, rows, answers)
    assert result.item_scores[0] == result.item_scores[2] == 0.0
    assert result.item_scores[1] == 1.0 and result.n == 3
    assert result.score == pytest.approx(1 / 3)
    assert f"Task {task_name!r}: the answer checker raised on 2 of 3 answers" in caplog.text
    assert repr(raising) in caplog.text
