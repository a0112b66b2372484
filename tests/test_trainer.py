"""MetisTrainer against a direct transcription of the algorithm, and its Trainer behaviour."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from metis_hf import MetisConfig, MetisTrainer
from metis_hf.merging.task_vectors import lora_parameters, lora_state
from metis_hf.tokenization import tokenize_example
from tests.conftest import make_tiny_model

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _data(n, k, offset=0):
    return Dataset.from_list(
        [
            {"prompt": f"What is {i + offset} + {k}?\nAnswer:", "completion": f" {i + offset + k}\n\n"}
            for i in range(n)
        ]
    )


TRAIN = {"add1": _data(20, 1), "add2": _data(16, 2), "add3": _data(12, 3)}
VAL = {"add1": _data(5, 1, 50), "add2": _data(5, 2, 50), "add3": _data(5, 3, 50)}


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        num_rounds=2,
        local_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_length=64,
        use_cpu=True,
        seed=3,
        logging_steps=1,
        disable_tqdm=True,
    )
    values.update(overrides)
    return MetisConfig(**values)


def _trainer(tmp_path, tokenizer, model=None, train=TRAIN, val=VAL, lora=None, **overrides):
    """``lora``: LoraConfig fields over the tests' LORA."""
    model = model if model is not None else make_tiny_model(len(tokenizer), seed=0)
    return MetisTrainer(
        model=model,
        args=_config(tmp_path, **overrides),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=LoraConfig(**{**LORA, **(lora or {})}),
    )


# --- a direct transcription of docs/method.md §2-3 ------------------------------------------


def _batch(tokenizer, rows):
    encoded = [tokenize_example(tokenizer, r["prompt"], r["completion"], 64)["input_ids"] for r in rows]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    return ids, mask


def _token_loss_sum(model, ids, mask, scored=None):
    """Summed next-token loss over the targets ``scored`` marks (default: every real token)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    keep = (mask if scored is None else scored)[:, 1:].float()
    return (loss * keep).sum(), keep.sum()


def _example_mean_loss(model, tokenizer, rows, completion_only=False):
    losses = []
    with torch.no_grad():
        for row in rows:
            ids, mask = _batch(tokenizer, [row])
            scored = None
            if completion_only:  # score only the completion (and EOS) tokens
                encoded = tokenize_example(tokenizer, row["prompt"], row["completion"], 64)
                scored = torch.tensor([encoded["completion_mask"]])
            total, count = _token_loss_sum(model, ids, mask, scored)
            losses.append(total / count)
    return float(torch.stack(losses).mean())


def _reference_round(
    base, tokenizer, initial, tasks, order, local_steps, micro, accum, temperature=2.0, delta=0.3, k=2
):
    """One METIS round, transcribed: each task trains from the initial adapter with a fresh AdamW
    (lr 3e-4, linear decay to 0, clip 1.0), then gaps, softmax weights, strict masks, consensus."""
    all_rows = [row for t in tasks for row in TRAIN[t]]
    cursor, locals_ = 0, []
    for _ in tasks:
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
        with torch.no_grad():
            for key, p in lora_parameters(model).items():
                p.copy_(initial[key])
        params = list(lora_parameters(model).values())
        optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
        for j in range(local_steps):
            for group in optimizer.param_groups:
                group["lr"] = 3e-4 * (1 - j / local_steps)
            batches = []
            for _ in range(accum):
                batches.append(_batch(tokenizer, [all_rows[i] for i in order[cursor : cursor + micro]]))
                cursor += micro
            total_tokens = sum(float(m[:, 1:].sum()) for _, m in batches)
            for ids, mask in batches:
                loss_sum, _ = _token_loss_sum(model, ids, mask)
                (loss_sum / total_tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        locals_.append((model, lora_state(model)))
    g0 = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    with torch.no_grad():
        for key, p in lora_parameters(g0).items():
            p.copy_(initial[key])
    gaps = [
        _example_mean_loss(g0, tokenizer, list(VAL[t])) - _example_mean_loss(m, tokenizer, list(VAL[t]))
        for t, (m, _) in zip(tasks, locals_)
    ]
    exps = [math.exp(g / temperature) for g in gaps]
    alphas = [e / sum(exps) for e in exps]
    merged = {}
    for key in initial:
        weighted = [a * state[key] for a, (_, state) in zip(alphas, locals_)]
        total = sum(weighted)
        owners = sum((w.abs() > delta * (total - w).abs()).int() for w in weighted)
        merged[key] = torch.where(owners >= k, total, torch.zeros_like(total))
    return merged, gaps


def test_one_sequential_round_equals_the_transcription(tmp_path, tiny_tokenizer):
    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    trainer = _trainer(tmp_path, tiny_tokenizer, model=copy.deepcopy(base), num_rounds=1)
    initial = lora_state(trainer.peft_model, "default")
    order = list(trainer._get_train_sampler())
    trainer.train()
    expected, gaps = _reference_round(base, tiny_tokenizer, initial, list(TRAIN), order, 3, 2, 2)
    got = lora_state(trainer.peft_model, "default")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    logged = trainer.round_records[0]
    assert [logged[f"merge/loss_gap/{t}"] for t in TRAIN] == pytest.approx(gaps, abs=1e-5)
    # the merged adapter really moved away from the initial one
    assert any(not torch.equal(got[k], initial[k]) for k in got)


def test_interleaved_and_sequential_give_the_same_merge(tmp_path, tiny_tokenizer):
    results, orders = [], []
    for schedule in ("sequential", "interleaved"):
        trainer = _trainer(tmp_path / schedule, tiny_tokenizer, task_schedule=schedule)
        orders.append([s.task for s in trainer.plan.steps])
        trainer.train()
        results.append(lora_state(trainer.peft_model, "default"))
    # the two runs really train the tasks in another order: 0 0 0 1 1 1 ... against 0 1 2 0 1 2 ...
    assert orders[0][:6] == [0, 0, 0, 1, 1, 1] and orders[1][:6] == [0, 1, 2, 0, 1, 2]
    assert sorted(orders[0]) == sorted(orders[1])
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=0)


def test_every_adapter_is_trained_and_merges_write_in_place(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, num_rounds=2, merge_method="task_arithmetic")
    peft_model = trainer.peft_model
    before = {t: lora_state(peft_model, t) for t in TRAIN}
    ids = {t: {k: id(p) for k, p in lora_parameters(peft_model, t).items()} for t in TRAIN}
    snapshots = {}

    class Spy(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # runs after the trainer's own callback: at a round's end, after its merge
            snapshots[state.global_step] = {t: lora_state(peft_model, t) for t in (*TRAIN, "default")}

    trainer.add_callback(Spy())
    trainer.create_optimizer()
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(i in held for t in TRAIN for i in ids[t].values())  # the optimizer holds every adapter
    trainer.train()
    first_end = trainer.plan.round_ends[0]
    last_before_merge = snapshots[first_end - 1]
    for t in TRAIN:
        # each task's adapter was trained (B moved off zero) ...
        changed = [k for k in before[t] if not torch.equal(before[t][k], last_before_merge[t][k])]
        assert changed, f"adapter {t} never changed"
        # ... and the merges wrote into the same Parameter objects
        assert {k: id(p) for k, p in lora_parameters(peft_model, t).items()} == ids[t]
    # after round 1's merge every task adapter equals the merged one (the start of round 2)
    after_merge = snapshots[first_end]
    for t in TRAIN:
        for k in after_merge["default"]:
            assert torch.equal(after_merge[t][k], after_merge["default"][k])


def test_adam_state_is_per_task_and_reset_each_round(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, local_steps=2)
    seen = []

    class Spy(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            steps = {}
            for t in TRAIN:
                param = next(iter(lora_parameters(trainer.peft_model, t).values()))
                steps[t] = int(inner.state[param]["step"]) if param in inner.state else 0
            seen.append(steps)

    trainer.add_callback(Spy())
    trainer.train()
    # round 1: add1 steps 1,2 then add2 1,2 then add3 1,2; the last step of the round is seen after
    # the merge reset (the round callback runs first), so it shows zeros. Round 2 starts again at 1.
    assert seen[0] == {"add1": 1, "add2": 0, "add3": 0}
    assert seen[1] == {"add1": 2, "add2": 0, "add3": 0}
    assert seen[2] == {"add1": 2, "add2": 1, "add3": 0}
    assert seen[5] == {"add1": 0, "add2": 0, "add3": 0}
    assert seen[6] == {"add1": 1, "add2": 0, "add3": 0}


def test_post_hoc_trains_all_steps_then_merges_once(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, protocol="post_hoc", num_rounds=2, local_steps=3)
    assert trainer.plan.total_steps == 3 * 2 * 3 and trainer.plan.round_ends == [18]
    many = _trainer(tmp_path / "m", tiny_tokenizer, num_rounds=2, local_steps=3)
    assert many.plan.total_steps == trainer.plan.total_steps and many.plan.round_ends == [9, 18]
    trainer.train()
    assert len(trainer.round_records) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["step"] == 18


def test_post_hoc_keeps_the_experts_and_merges_them_once(tmp_path, tiny_tokenizer):
    trainer = _trainer(
        tmp_path, tiny_tokenizer, protocol="post_hoc", merge_method="task_arithmetic", local_steps=2
    )
    trainer.train()
    experts = [lora_state(trainer.peft_model, t) for t in TRAIN]
    assert not torch.equal(*(next(iter(e.values())) for e in experts[:2]))  # trained apart
    # the merged adapter is the task-arithmetic merge at 1/T of the experts, which stay as trained
    merged = lora_state(trainer.peft_model, "default")
    for key, value in merged.items():
        expected = sum(e[key] for e in experts) / len(experts)
        torch.testing.assert_close(value, expected)


def test_round_rows_are_logged(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer)
    trainer.train()
    rows = [h for h in trainer.state.log_history if "round" in h]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for t in TRAIN:
            for name in ("alpha", "loss_gap", "val_loss_merged", "val_loss_local"):
                assert f"merge/{name}/{t}" in row
        assert 0 < row["merge/mask_density"] <= 1 and row["merge/multitask_loss"] > 0
        assert sum(row[f"merge/alpha/{t}"] for t in TRAIN) == pytest.approx(1.0)
    # the gap of round 2 uses the merged loss measured right after round 1
    assert rows[1]["merge/loss_gap/add2"] == pytest.approx(
        rows[0]["merge/val_loss_merged/add2"] - rows[1]["merge/val_loss_local/add2"], abs=1e-6
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(val={"add1": VAL["add1"]}), "train and eval task names differ"),
        (
            dict(train={**TRAIN, "empty": TRAIN["add1"].select([])}, val={**VAL, "empty": VAL["add1"]}),
            "'empty' has no training data",
        ),
        (dict(val=None), "metis needs eval_dataset"),
        (
            dict(train={"a.b": TRAIN["add1"]}, val={"a.b": VAL["add1"]}),
            "not usable as an adapter and folder name",
        ),
    ],
)
@pytest.mark.bad_input
def test_bad_input_fails_before_training(tmp_path, tiny_tokenizer, change, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, tiny_tokenizer, **change)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_rounds=0), "num_rounds must be"),
        (dict(merge_method="nope"), "Unknown merge method"),
        (dict(merge_method="ties", merge_params={"delta": 0.2}), "merge_params has 'delta'"),
        (dict(merge_params={"loss_gaps": [1]}), "merge_params has 'loss_gaps'"),
        (dict(temperature=[1.0, 2.0, 3.0]), "temperature has 3 values for 2 rounds"),
        (dict(task_schedule="random"), "task_schedule"),
        (dict(gap_tokens="prompt"), "gap_tokens must be one of"),
        # merging round updates
        ({"merge_method": "ties", "merge_params": {"scale": "auto"}}, "set merge_round_updates"),
        ({"merge_method": "metis", "merge_params": {"beta": "auto"}}, "set merge_round_updates"),
        (
            {"merge_method": "task_arithmetic", "merge_round_updates": True, "merge_space": "dense"},
            "merge_space 'dense' would truncate each round's update",
        ),
        (
            {"merge_method": "tsv_m", "merge_round_updates": True, "save_task_adapters": True},
            "save_task_adapters must be False",
        ),
        (
            {"merge_method": "iso_c", "merge_round_updates": True, "reset_optimizer_each_round": False},
            "reset_optimizer_each_round must be True",
        ),
        (
            {"merge_method": "ties", "merge_round_updates": True, "merge_params": {"scale": "most"}},
            "scale",
        ),
    ],
)
@pytest.mark.bad_input
def test_bad_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


@pytest.mark.bad_input
def test_non_lora_peft_config_is_refused(tmp_path, tiny_tokenizer):
    from peft import PrefixTuningConfig

    with pytest.raises(ValueError, match="LoraConfig"):
        MetisTrainer(
            model=make_tiny_model(len(tiny_tokenizer)),
            args=_config(tmp_path),
            train_dataset=TRAIN,
            eval_dataset=VAL,
            processing_class=tiny_tokenizer,
            peft_config=PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        )


def _child(output_dir, *extra, launcher=None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    command = launcher or [sys.executable]
    return subprocess.run(
        [*command, "-m", "tests.train_child", str(output_dir), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _final_adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "adapter_model.safetensors"))


def _assert_group_released(folder, processes: int) -> None:
    """After trainer.end(), no rank still runs a gloo thread: a group outliving end() is torn down
    during the interpreter's exit, where it can abort a finished run (SIGABRT)."""
    for rank in range(processes):
        threads = json.loads((folder / f"threads-after-end-{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], (rank, threads)


def test_run_killed_mid_round_resumes_to_the_same_merge(tmp_path):
    from safetensors.torch import load_file

    whole = _child(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _child(tmp_path / "broken", "--kill-at-step", "5", "--checkpoints")  # round 1 ends at step 9
    assert killed.returncode == -9
    assert (tmp_path / "broken" / "checkpoint-5" / "metis_state.json").is_file()
    assert not (tmp_path / "broken" / "final").exists()
    resumed = _child(tmp_path / "broken", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "broken" / "final" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    rounds = [json.loads(x) for x in (tmp_path / "broken" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]  # each round logged once across the two processes


def test_save_model_writes_merged_adapter_full_model_and_task_adapters(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        model=copy.deepcopy(base),
        num_rounds=1,
        save_task_adapters=True,
        save_merged_model=True,
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    merged = lora_state(trainer.peft_model, "default")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out)
    for key, value in lora_state(loaded).items():
        torch.testing.assert_close(value, merged[key])
    for t in TRAIN:
        assert (out / "task_adapters" / t / "adapter_model.safetensors").is_file()
    full = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, loaded(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def _torchrun(processes: int) -> list[str]:
    import socket
    import sys

    with socket.socket() as probe:  # a free loopback port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_two_cpu_processes_match_one_at_the_same_global_batch(tmp_path, schedule):
    """Plain SGD, so a wrong gradient scale across processes (AdamW normalises it away) changes
    the merge; both the per-task schedule and the parallel one (per-task token counts reduced
    across processes)."""
    torchrun = _torchrun(2)
    common = ["--sgd", "--schedule", schedule]
    single = _child(tmp_path / "one", *common, "--accum", "4")  # micro-batch rows x 4 per step
    assert single.returncode == 0, single.stderr[-3000:]
    double = _child(tmp_path / "two", *common, "--accum", "2", launcher=torchrun)  # rows x 2 x 2 ranks
    assert double.returncode == 0, double.stderr[-3000:]
    _assert_group_released(tmp_path / "two", 2)
    one, two = _final_adapter(tmp_path / "one"), _final_adapter(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    assert any(float(v.abs().sum()) > 0 for k, v in one.items() if "lora_B" in k)


def test_parallel_schedule_gives_the_same_merge(tmp_path, tiny_tokenizer):
    # Plain SGD: Adam would turn float32 summation-order noise into lr-sized steps on entries whose
    # gradient is near zero, hiding what this test checks (the same gradients reach each adapter).
    sgd = dict(optim="sgd", learning_rate=0.5)
    sequential = _trainer(tmp_path / "s", tiny_tokenizer, per_device_train_batch_size=2, **sgd)
    sequential.train()
    # three tasks x 2 rows each per micro-batch, one batched forward per micro-batch
    parallel = _trainer(
        tmp_path / "p", tiny_tokenizer, per_device_train_batch_size=6, task_schedule="parallel", **sgd
    )
    assert parallel.plan.total_steps == sequential.plan.total_steps // 3
    parallel.train()
    expected, got = lora_state(sequential.peft_model, "default"), lora_state(parallel.peft_model, "default")
    for key in expected:
        scale = float(expected[key].abs().max())
        assert scale > 1e-4  # trained, not the zero init of B
        torch.testing.assert_close(got[key], expected[key], atol=1e-4 * scale, rtol=1e-4)
    for t in TRAIN:
        assert parallel.round_records[0][f"merge/loss_gap/{t}"] == pytest.approx(
            sequential.round_records[0][f"merge/loss_gap/{t}"], rel=1e-3
        )


@pytest.mark.bad_input
def test_parallel_needs_a_batch_divisible_by_the_tasks(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="multiple of the number of tasks"):
        _trainer(tmp_path, tiny_tokenizer, per_device_train_batch_size=4, task_schedule="parallel")


def test_the_initial_adapter_depends_on_the_seed_only(tmp_path, tiny_tokenizer):
    models = [make_tiny_model(len(tiny_tokenizer), seed=0) for _ in range(3)]
    first = lora_state(_trainer(tmp_path, tiny_tokenizer, model=models[0], seed=5).peft_model, "default")
    torch.randn(1000)  # whatever ran before in the process must not matter
    again = lora_state(
        _trainer(tmp_path / "b", tiny_tokenizer, model=models[1], seed=5).peft_model, "default"
    )
    other = lora_state(
        _trainer(tmp_path / "c", tiny_tokenizer, model=models[2], seed=6).peft_model, "default"
    )
    key = next(k for k in first if "lora_A" in k)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[key], other[key])


def test_metis_robust_weights_use_relative_gaps_of_the_previous_merge(tmp_path, tiny_tokenizer):
    from metis_hf.merging import robust_weights

    trainer = _trainer(tmp_path, tiny_tokenizer, merge_method="metis_robust", num_rounds=2)
    trainer.train()
    first, second = trainer.round_records
    tasks = list(TRAIN)
    gaps = [second[f"merge/loss_gap/{t}"] for t in tasks]
    before = [first[f"merge/val_loss_merged/{t}"] for t in tasks]  # the merge round 2 started from
    expected = robust_weights(gaps, before, temperature=0.1)
    assert [second[f"merge/alpha/{t}"] for t in tasks] == pytest.approx(expected)
    assert min(expected) >= 0.5 / len(tasks) - 1e-9


def _robust_trainer(tmp_path, tokenizer, base, lora=None, **overrides):
    """A metis_robust trainer on a copy of ``base`` (kept untouched, to compute expectations on)."""
    return _trainer(
        tmp_path, tokenizer, copy.deepcopy(base), lora=lora, merge_method="metis_robust", **overrides
    )


def test_erased_share_weights_use_the_base_models_losses(tmp_path, tiny_tokenizer):
    from metis_hf.merging import robust_weights

    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    # lora_B random, not zero: G_0 differs from the base model, whose losses the shares need
    lora = {"init_lora_weights": False}
    trainer = _robust_trainer(
        tmp_path, tiny_tokenizer, base, lora, merge_params={"gap_normalization": "erased"}, num_rounds=2
    )
    trainer.train()
    first, second = trainer.round_records
    tasks = list(TRAIN)
    base_losses = [_example_mean_loss(base, tiny_tokenizer, list(VAL[t])) for t in tasks]
    assert [first[f"merge/base_loss/{t}"] for t in tasks] == pytest.approx(base_losses, abs=1e-4)
    g0_losses = [first[f"merge/loss_gap/{t}"] + first[f"merge/val_loss_local/{t}"] for t in tasks]
    assert max(abs(a - b) for a, b in zip(base_losses, g0_losses)) > 1e-2  # a real difference
    gaps = [second[f"merge/loss_gap/{t}"] for t in tasks]
    before = [first[f"merge/val_loss_merged/{t}"] for t in tasks]
    expected = robust_weights(gaps, before, gap_normalization="erased", base_losses=base_losses)
    # abs 1e-3: the share divides by the small gain a tiny model makes, which magnifies the float
    # difference between the fused training loss and this test's plain cross-entropy (measured 2e-4)
    assert [second[f"merge/alpha/{t}"] for t in tasks] == pytest.approx(expected, abs=1e-3)
    # and not the relative gaps' weights: the base losses matter
    relative = robust_weights(gaps, before)
    assert max(abs(a - b) for a, b in zip(expected, relative)) > 1e-2, (expected, relative)


def test_gaps_on_completion_tokens_under_all_token_training(tmp_path, tiny_tokenizer):
    from metis_hf.merging import robust_weights

    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    trainer = _robust_trainer(
        tmp_path,
        tiny_tokenizer,
        base,
        merge_params={"gap_normalization": "standardized"},
        gap_tokens="completion",
        num_rounds=1,
    )
    trainer.train()
    tasks, record = list(TRAIN), trainer.round_records[0]
    # G_0 has lora_B = 0: before the first merge, every task's loss is the base model's. After the
    # last round each task adapter keeps its local result.
    before = [_example_mean_loss(base, tiny_tokenizer, list(VAL[t]), completion_only=True) for t in tasks]
    local = []
    for t in tasks:
        trainer.peft_model.set_adapter(t)
        local.append(
            _example_mean_loss(trainer.peft_model, tiny_tokenizer, list(VAL[t]), completion_only=True)
        )
    gaps = [b - a for b, a in zip(before, local)]
    assert [record[f"merge/loss_gap/{t}"] for t in tasks] == pytest.approx(gaps, abs=1e-4)
    assert [record[f"merge/completion_loss_local/{t}"] for t in tasks] == pytest.approx(local, abs=1e-4)
    expected = robust_weights(gaps, None, gap_normalization="standardized")
    assert [record[f"merge/alpha/{t}"] for t in tasks] == pytest.approx(expected, abs=1e-4)
    # the logged validation loss stays the trained (all-token) one, which differs
    all_tokens = _example_mean_loss(trainer.peft_model, tiny_tokenizer, list(VAL["add3"]))
    assert record["merge/val_loss_local/add3"] == pytest.approx(all_tokens, abs=1e-4)
    assert abs(all_tokens - local[2]) > 1e-3
    # standardized gaps do not read the base model's losses, so they are not measured
    assert not any(key.startswith("merge/base_loss/") for key in record)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The output folder of one uninterrupted child run per schedule, shared by the resume cases."""
    runs: dict[str, Path] = {}

    def run(schedule: str) -> Path:
        if schedule not in runs:
            folder = tmp_path_factory.mktemp(f"whole-{schedule}")
            result = _child(folder, "--schedule", schedule)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[schedule] = folder
        return runs[schedule]

    return run


@pytest.mark.parametrize(
    "schedule,save_steps,kill_at,resumes_from",
    [
        ("sequential", 4, 11, 8),  # round 1 ends at step 9: the merge is replayed
        ("sequential", 4, 15, 12),  # after the merge: round 2's steps 13-15 are replayed
        ("parallel", 2, 3, 2),  # round 1 ends at step 3, killed right after its merge
        ("parallel", 2, 5, 4),
    ],
)
def test_run_killed_after_a_merge_replays_and_ends_with_the_same_merge(
    tmp_path, uninterrupted, schedule, save_steps, kill_at, resumes_from
):
    """Killed without a checkpoint at the kill step, so the resumed run replays steps (and, in two
    cases, the first merge) from an earlier checkpoint; each round is logged exactly once."""
    from safetensors.torch import load_file

    schedule_args = ["--schedule", schedule]
    whole = uninterrupted(schedule)
    command = [*schedule_args, "--checkpoints", "--save-steps", str(save_steps)]
    killed = _child(tmp_path / "broken", *command, "--kill-at-step", str(kill_at), "--no-save-at-kill")
    assert killed.returncode == -9
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "broken").glob("checkpoint-*"))
    assert checkpoints[-1] == resumes_from
    state = json.loads((tmp_path / "broken" / f"checkpoint-{resumes_from}" / "metis_state.json").read_text())
    first_merge = 3 if schedule == "parallel" else 9  # the step after which round 1 merges
    assert len(state["round_records"]) == (1 if resumes_from >= first_merge else 0)
    assert kill_at >= first_merge  # every case kills after the first merge (callbacks: ours first)
    resumed = _child(tmp_path / "broken", *command, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(str(whole / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "broken" / "final" / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    rounds = [json.loads(x) for x in (tmp_path / "broken" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    whole_rounds = [json.loads(x) for x in (whole / "rounds.jsonl").read_text().splitlines()]
    for mine, theirs in zip(rounds, whole_rounds):
        assert mine == pytest.approx(theirs, abs=1e-6)
    history = json.loads((tmp_path / "broken" / "final" / "log_history.json").read_text())
    assert [entry["round"] for entry in history if "round" in entry] == [1, 2]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match="No checkpoint found in .* to resume from"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "method,params",
    [("metis", {"temperature": 2.0, "delta": 0.3, "k": 2, "beta": 1.0}), ("ties", {"scale": 0.5})],
)
def test_a_run_branched_before_its_first_merge_equals_the_unbranched_run(
    tmp_path, tiny_tokenizer, method, params
):
    """The trunk trains round 1 under another method and stops before merging; the branch resumes
    there with its own method. Its merges, round records and final adapter are the unbranched run's."""
    from metis_hf.training.trainer import training_signature

    whole = _trainer(tmp_path / "whole", tiny_tokenizer, merge_method=method, merge_params=params)
    whole.train()
    trunk = _trainer(tmp_path / "trunk", tiny_tokenizer, merge_method="task_arithmetic")
    assert training_signature(trunk.args) == training_signature(whole.args)
    checkpoint = trunk.train_to_branch_point(0)
    assert trunk.state.global_step == trunk.plan.round_ends[0] and not trunk.round_records
    branch = _trainer(
        tmp_path / "branch",
        tiny_tokenizer,
        merge_method=method,
        merge_params=params,
        output_dir=str(tmp_path / "branch" / "run"),
    )
    branch.train(resume_from_checkpoint=checkpoint)
    assert [r["round"] for r in branch.round_records] == [1, 2]
    for mine, theirs in zip(branch.round_records, whole.round_records):
        assert mine == pytest.approx(theirs, abs=1e-6)
    expected, got = lora_state(whole.peft_model, "default"), lora_state(branch.peft_model, "default")
    assert any(float(v.abs().max()) > 0 for v in expected.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert json.loads(Path(checkpoint, "metis_state.json").read_text())["pending_merge"] == 0


@pytest.mark.parametrize("method", ["metis", "task_arithmetic"])
def test_task_parallel_over_2_and_4_processes_ends_with_the_sequential_merge(tmp_path, method):
    """Four tasks, plain SGD: one process training them in turn, and 2 and 4 gloo processes each
    training its own tasks (no per-step communication, the adapters exchanged once a round) end
    with the same merged adapter and the same round records; the exchange is T adapters a round."""
    common = ["--sgd", "--four-tasks", "--merge-method", method, "--accum", "2"]
    single = _child(tmp_path / "one", *common)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _final_adapter(tmp_path / "one")
    one_rounds = [json.loads(x) for x in (tmp_path / "one" / "rounds.jsonl").read_text().splitlines()]
    assert any(float(v.abs().sum()) > 0 for k, v in one.items() if "lora_B" in k)
    for processes in (2, 4):
        folder = tmp_path / f"tp{processes}"
        run = _child(folder, *common, "--schedule", "task_parallel", launcher=_torchrun(processes))
        assert run.returncode == 0, run.stderr[-3000:]
        _assert_group_released(folder, processes)
        got = _final_adapter(folder)
        for key in one:
            torch.testing.assert_close(got[key], one[key], atol=1e-5, rtol=1e-4)
        rounds = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
        adapter_bytes = sum(v.numel() * v.element_size() for v in one.values())  # one adapter's factors
        for mine, theirs in zip(rounds, one_rounds, strict=True):
            assert mine.pop("merge/exchanged_bytes") == 4 * adapter_bytes
            assert mine["step"] == theirs["step"] // processes  # each process trains T / processes tasks
            assert {**mine, "step": 0} == pytest.approx({**theirs, "step": 0}, abs=1e-5)


def test_task_parallel_needs_a_process_count_dividing_the_tasks():
    from metis_hf.training.plan import RoundPlan

    with pytest.raises(ValueError, match="3 tasks cannot be split between 2 processes"):
        RoundPlan(["a", "b", "c"], [2, 2, 2], rounds=1, schedule="task_parallel", processes=2)
    plan = RoundPlan(["a", "b", "c", "d"], [2, 2, 2, 2], rounds=2, schedule="task_parallel", processes=2)
    assert plan.process_tasks == [[0, 2], [1, 3]] and plan.round_ends == [4, 8]
    assert [s.task for s in plan.process_steps[1][:4]] == [1, 1, 3, 3]


def test_task_parallel_checkpoints_at_round_ends_and_resumes_to_the_same_merge(tmp_path):
    """Two processes, killed right after round 1's checkpoint: checkpoints exist only at round ends
    (mid-round each process holds only its own tasks' adapters), and the resumed run ends with
    the uninterrupted run's merge."""
    common = ["--sgd", "--four-tasks", "--accum", "2", "--schedule", "task_parallel", "--checkpoints"]
    whole = _child(tmp_path / "whole", *common, launcher=_torchrun(2))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-6",
    ]
    killed = _child(tmp_path / "broken", *common, "--kill-at-step", "6", launcher=_torchrun(2))
    assert killed.returncode != 0
    resumed = _child(tmp_path / "broken", *common, "--resume", launcher=_torchrun(2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _final_adapter(tmp_path / "whole"), _final_adapter(tmp_path / "broken")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    rounds = [json.loads(x) for x in (tmp_path / "broken" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]


def test_task_parallel_in_one_process_is_the_sequential_schedule(tmp_path, tiny_tokenizer):
    results = []
    for schedule in ("sequential", "task_parallel"):
        trainer = _trainer(tmp_path / schedule, tiny_tokenizer, task_schedule=schedule)
        trainer.train()
        results.append((lora_state(trainer.peft_model, "default"), trainer.round_records))
    (sequential, sequential_rounds), (task_parallel, rounds) = results
    for key in sequential:
        torch.testing.assert_close(task_parallel[key], sequential[key], atol=0, rtol=0)
    assert [r.pop("merge/exchanged_bytes") for r in rounds] == [0, 0]
    assert rounds == sequential_rounds


# --- merging each round's updates -------------------------------------------------------------


def _capture_merges(trainer):
    """Wraps ``trainer.rounds.merge``: each merge's task adapters, G before it, parameters and result."""
    captured = []
    merge_once = trainer.rounds.merge

    def spy(params, last_round):
        peft_model = trainer.peft_model
        adapters = {t: lora_state(peft_model, t) for t in TRAIN}
        start = lora_state(peft_model, "default")
        merged, truncation = merge_once(params, last_round)
        after = {t: lora_state(peft_model, t) for t in TRAIN}
        captured.append(
            {"adapters": adapters, "start": start, "params": dict(params), "merged": merged, "after": after}
        )
        return merged, truncation

    trainer.rounds.merge = spy
    return captured


def test_round_updates_at_a_scale_add_the_scaled_sum_of_updates(tmp_path, tiny_tokenizer):
    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        merge_method="task_arithmetic",
        merge_round_updates=True,
        merge_params={"scale": 0.7},
    )
    captured = _capture_merges(trainer)
    trainer.train()
    assert len(captured) == 2
    for merge in captured:
        start = merge["start"]
        assert any(not torch.equal(start[k], merge["adapters"]["add1"][k]) for k in start)
        for key in start:
            expected = start[key] + 0.7 * sum(merge["adapters"][t][key] - start[key] for t in TRAIN)
            torch.testing.assert_close(merge["merged"][key], expected, atol=1e-6, rtol=1e-6)
    # round 2 started from round 1's merge
    for key, value in captured[0]["merged"].items():
        assert torch.equal(captured[1]["start"][key], value)


def test_round_updates_at_one_over_t_are_fedavg(tmp_path, tiny_tokenizer):
    """G + (1/T) sum_t (x_t - G) is the mean of the adapters: the same run as merging them."""
    runs = {}
    for updates in (False, True):
        trainer = _trainer(
            tmp_path / str(updates),
            tiny_tokenizer,
            merge_method="task_arithmetic",
            merge_round_updates=updates,
        )
        trainer.train()
        runs[updates] = lora_state(trainer.peft_model, "default")
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, atol=1e-5, rtol=1e-5)


def test_scale_auto_chooses_the_lowest_validation_loss_each_round(tmp_path, tiny_tokenizer):
    from metis_hf.merging.scale_search import SCALE_CANDIDATES
    from metis_hf.merging.task_vectors import load_lora_state
    from metis_hf.merging.ties import ties

    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        merge_method="ties",
        merge_round_updates=True,
        merge_params={"scale": "auto", "density": 0.5},
        learning_rate=3e-3,
    )
    captured = _capture_merges(trainer)
    trainer.train()
    peft_model = trainer.peft_model
    peft_model.set_adapter("default")
    chosen_scales = []
    for merge, record in zip(captured, trainer.round_records):
        start, chosen = merge["start"], merge["params"]["scale"]
        assert record["merge/scale"] == chosen
        # the round's update: TIES (tensor by tensor, tested against PEFT) on the task adapters' updates
        updates = [{k: merge["adapters"][t][k] - start[k] for k in start} for t in TRAIN]
        update = {k: ties([u[k] for u in updates], density=0.5) for k in start}
        for key in start:
            torch.testing.assert_close(merge["merged"][key], start[key] + chosen * update[key])

        def multitask_loss(scale, start=start, update=update):
            load_lora_state(peft_model, {k: start[k] + scale * update[k] for k in start}, "default")
            return sum(_example_mean_loss(peft_model, tiny_tokenizer, list(VAL[t])) for t in VAL) / len(VAL)

        best = multitask_loss(chosen)
        assert record["merge/multitask_loss"] == pytest.approx(best, abs=1e-5)
        assert all(best <= multitask_loss(s) + 1e-6 for s in SCALE_CANDIDATES)
        chosen_scales.append(chosen)
    assert chosen_scales != [1.0, 1.0]  # not vacuous: the search moved off the placeholder


def test_scale_auto_on_the_worst_task_minimises_the_largest_share_of_a_round_gain_lost(
    tmp_path, tiny_tokenizer
):
    from metis_hf.merging.scale_search import SCALE_CANDIDATES
    from metis_hf.merging.task_vectors import load_lora_state

    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        merge_method="task_arithmetic",
        merge_round_updates=True,
        merge_params={"scale": "auto"},
        scale_objective="worst_task",
        learning_rate=3e-3,
    )
    captured = _capture_merges(trainer)
    trainer.train()
    peft_model = trainer.peft_model
    chosen_scales = []
    for merge in captured:
        start, chosen = merge["start"], merge["params"]["scale"]
        update = {k: sum(merge["adapters"][t][k] - start[k] for t in TRAIN) for k in start}

        def task_losses(state):
            load_lora_state(peft_model, state, "default")
            peft_model.set_adapter("default")
            return {t: _example_mean_loss(peft_model, tiny_tokenizer, list(VAL[t])) for t in VAL}

        start_losses = task_losses(start)
        local = {t: task_losses(merge["adapters"][t])[t] for t in VAL}
        gained = [t for t in VAL if start_losses[t] > local[t]]
        assert gained  # the tasks' own adapters improved on the start: the share is defined

        def worst_lost(
            scale, start=start, update=update, start_losses=start_losses, local=local, gained=gained
        ):
            merged = task_losses({k: start[k] + scale * update[k] for k in start})
            share = max((merged[t] - local[t]) / (start_losses[t] - local[t]) for t in gained)
            return share, sum(merged.values()) / len(merged)

        tried = {scale: worst_lost(scale) for scale in (*SCALE_CANDIDATES, chosen)}
        assert all(tried[chosen][0] <= share + 1e-5 for share, _ in tried.values())
        chosen_scales.append(chosen)
    assert chosen_scales != [1.0, 1.0]  # not vacuous: the search moved off the placeholder


def test_the_scale_objective_decides_what_a_search_minimises():
    from types import SimpleNamespace

    from metis_hf.training.round_merge import RoundMerger

    losses = {"a": 1.25, "b": 0.9, "c": 3.0}
    merger = RoundMerger(SimpleNamespace(args=SimpleNamespace(), task_names=list(losses)), {})
    merger.val_losses = lambda adapter: (losses, None)
    merger.round_start_losses = {"a": 2.0, "b": 1.0, "c": 0.5}
    merger.round_local_losses = {"a": 1.0, "b": 0.5, "c": 0.7}
    merger.args.scale_objective = "multitask_loss"
    assert merger.search_loss() == pytest.approx((1.25 + 0.9 + 3.0) / 3)
    merger.args.scale_objective = "worst_task"
    assert merger.search_loss() == pytest.approx(0.8)  # b lost 0.4 of its 0.5 gain


def test_worst_share_lost_reads_only_tasks_whose_adapter_gained():
    from metis_hf.training.round_merge import worst_share_lost

    start = {"a": 2.0, "b": 1.0, "c": 0.5}
    local = {"a": 1.0, "b": 0.5, "c": 0.7}  # c's own adapter got worse: no gain to lose
    merged = {"a": 1.25, "b": 0.9, "c": 3.0}
    # a lost 0.25 of its 1.0 gain, b 0.4 of its 0.5; c is not read
    assert worst_share_lost(merged, start, local) == pytest.approx(0.8)
    assert worst_share_lost(merged, start, {"a": 2.5, "b": 1.0, "c": 0.5}) == pytest.approx(
        (1.25 + 0.9 + 3.0) / 3
    )


@pytest.mark.bad_input
def test_scale_auto_needs_validation_data(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="chosen on eval_dataset"):
        _trainer(
            tmp_path,
            tiny_tokenizer,
            val=None,
            merge_method="task_arithmetic",
            merge_round_updates=True,
            merge_params={"scale": "auto"},
        )


@pytest.mark.bad_input
def test_all_token_training_warns_when_answers_are_cut_away(tmp_path, tiny_tokenizer, caplog):
    from metis_hf.tokenization import tokenize_example

    prompt_lengths = [
        len(tokenize_example(tiny_tokenizer, r["prompt"], "", 10**9)["input_ids"]) for r in TRAIN["add1"]
    ]
    with caplog.at_level("WARNING"):
        _trainer(tmp_path, tiny_tokenizer, max_length=min(prompt_lengths) - 1)
    assert "task 'add1' train: 20 of 20 examples lose their whole answer to max_length" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _trainer(tmp_path / "long", tiny_tokenizer, max_length=64)
    assert "lose their whole answer" not in caplog.text


# --- round updates folded into the base (the core space) ----------------------------------------


def _base_weights(trainer):
    return {
        name.removesuffix(".base_layer.weight"): p.detach().clone()
        for name, p in trainer.peft_model.named_parameters()
        if name.endswith(".base_layer.weight")
    }


def _dense_update(state, scaling):
    """Module prefix -> scaling * B @ A, by hand."""
    return {
        key.removesuffix(".lora_A.weight"): scaling * state[key.replace("lora_A", "lora_B")] @ state[key]
        for key in state
        if key.endswith(".lora_A.weight")
    }


def test_core_round_updates_are_summed_exactly_into_the_base_and_saved_as_one_adapter(
    tmp_path, tiny_tokenizer
):
    from peft import PeftModel

    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        model=copy.deepcopy(base),
        merge_method="task_arithmetic",
        merge_space="core",
        merge_round_updates=True,
        merge_params={"scale": 0.7},
    )
    original = _base_weights(trainer)
    initial = lora_state(trainer.peft_model, "default")
    captured = _capture_merges(trainer)
    trainer.train()
    scaling = LORA["lora_alpha"] / LORA["r"]
    expected = {prefix: weight.clone() for prefix, weight in original.items()}
    for merge in captured:
        assert all(torch.equal(merge["start"][k], initial[k]) for k in initial)  # G stays at zero
        for t in TRAIN:
            for prefix, update in _dense_update(merge["adapters"][t], scaling).items():
                expected[prefix] += 0.7 * update
    # each round restarts every adapter from the initialisation: task adapters hold one round's update
    for t in TRAIN:
        assert all(torch.equal(captured[0]["after"][t][k], initial[k]) for k in initial)
        assert any(not torch.equal(captured[1]["adapters"][t][k], initial[k]) for k in initial)
    folded = _base_weights(trainer)
    for prefix in expected:
        assert not torch.allclose(expected[prefix], original[prefix])
        torch.testing.assert_close(folded[prefix], expected[prefix], atol=1e-5, rtol=1e-5)
    # the saved adapter, on the untouched base, is the same model
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * len(TRAIN) * LORA["r"] and saved["lora_alpha"] == saved["r"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved").merge_and_unload()
    weights = dict(reloaded.named_parameters())
    for prefix, weight in expected.items():
        name = prefix.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(weights[name], weight, atol=1e-5, rtol=1e-5)


def test_core_round_updates_with_auto_scale_choose_the_lowest_validation_loss(tmp_path, tiny_tokenizer):
    from metis_hf.merging.scale_search import SCALE_CANDIDATES

    base = make_tiny_model(len(tiny_tokenizer), seed=0)
    trainer = _trainer(
        tmp_path,
        tiny_tokenizer,
        model=copy.deepcopy(base),
        merge_method="tsv_m",
        merge_round_updates=True,
        merge_params={"scale": "auto"},
        learning_rate=3e-3,
        num_rounds=1,
    )
    original = _base_weights(trainer)
    captured = _capture_merges(trainer)
    trainer.train()
    (merge,) = captured
    chosen = merge["params"]["scale"]
    folded = _base_weights(trainer)
    update = {prefix: (folded[prefix] - original[prefix]) / chosen for prefix in original}
    # TSV-M of the task updates in the core space (tested against the dense one and the authors'
    # code in test_svd_methods) is that update
    from metis_hf.merging.task_vectors import lora_to_dense, merge_lora_states

    scaling = LORA["lora_alpha"] / LORA["r"]
    states = [merge["adapters"][t] for t in TRAIN]
    rank = len(TRAIN) * LORA["r"]
    factors, _ = merge_lora_states(
        "tsv_m", states, space="core", rank=rank, scaling=scaling, output_scaling=1.0
    )
    for prefix, value in lora_to_dense(factors, 1.0).items():
        torch.testing.assert_close(update[prefix], value, atol=1e-5, rtol=1e-4)
    model = copy.deepcopy(base)

    def multitask_loss(scale):
        with torch.no_grad():
            for prefix, weight in original.items():
                name = prefix.removeprefix("base_model.model.") + ".weight"
                model.get_parameter(name).copy_(weight + scale * update[prefix])
        return sum(_example_mean_loss(model, tiny_tokenizer, list(VAL[t])) for t in VAL) / len(VAL)

    best = multitask_loss(chosen)
    assert trainer.round_records[0]["merge/multitask_loss"] == pytest.approx(best, abs=1e-5)
    assert all(best <= multitask_loss(s) + 1e-6 for s in SCALE_CANDIDATES)
    assert chosen != 1.0


def test_core_round_updates_resume_with_their_folded_rounds(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    settings = dict(
        merge_method="task_arithmetic",
        merge_space="core",
        merge_round_updates=True,
        merge_params={"scale": 0.5},
        save_strategy="steps",
    )
    whole = _trainer(tmp_path / "whole", tiny_tokenizer, **settings, save_steps=1000)
    whole.train()
    whole.save_model(str(tmp_path / "whole" / "final"))
    first_round_end = whole.plan.round_ends[0]
    broken = _trainer(tmp_path / "broken", tiny_tokenizer, **settings, save_steps=first_round_end)
    broken.train()
    checkpoint = tmp_path / "broken" / "run" / f"checkpoint-{first_round_end}"
    assert (checkpoint / "metis_folded.safetensors").is_file()
    resumed = _trainer(tmp_path / "broken", tiny_tokenizer, **settings, save_steps=1000)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model(str(tmp_path / "resumed"))
    expected = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    for prefix, weight in _base_weights(whole).items():
        torch.testing.assert_close(_base_weights(resumed)[prefix], weight, atol=1e-6, rtol=1e-5)
