"""The GPU check's CPU dry mode: every section of benchmarks/gpu_check.py runs, so the script a
lent GPU machine will run has not rotted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_fills_every_section(tmp_path):
    out = tmp_path / "dry.json"
    command = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--dry-run",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert not any(
        "error" in section or "skipped" in section
        for section in (summary["copy"], summary["merge"], summary["trainer"])
    )
    assert summary["copy"]["gb_per_s"] > 0
    rows = {(r["method"], r["implementation"]): r for r in summary["merge"]["rows"]}
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        for implementation in ("metis-hf", "peft", "mergekit"):
            assert rows[method, implementation]["seconds"] > 0, (method, implementation)
    assert rows["metis", "metis-hf"]["share_of_copy_bandwidth"] > 0
    trainer = summary["trainer"]
    assert {kind: trainer[kind]["sequences"] for kind in trainer} == {
        "sft": 32,
        "metis_sequential": 32,
        "metis_parallel": 32,
    }
    assert all(trainer[kind]["optimizer_steps"] == 8 for kind in trainer)
