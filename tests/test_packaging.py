"""The package as users get it: the wheel built from the sdist, installed into a fresh virtual
environment outside the checkout (no editable install), run from a temporary folder."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ("merged_adapter.md.j2", "merged_model.md.j2", "comparison_report.md.j2")

RENDER_EVERY_CARD = """
import os
import sys
import metis_hf
from metis_hf.hub import TEMPLATES, card_info_for, write_card
assert metis_hf.__file__.startswith(sys.prefix), metis_hf.__file__  # the installed wheel, not the checkout
for kind in TEMPLATES:
    info = card_info_for(kind, "ties", "merge", "org/base", tasks=["a", "b"], config_text="merge_method: ties")
    os.makedirs(f"card-{kind}")
    print(write_card(f"card-{kind}", info))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, metis-hf script, dist folder) of the wheel installed into a fresh venv."""
    work = tmp_path_factory.mktemp("package")
    dist = work / "dist"
    # The wheel is built from the sdist, as pip does with an sdist from PyPI.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (wheel,) = dist.glob("metis_hf-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
    )
    # Dependencies from this environment: a path line (no nested .pth files, so not our editable
    # install's finder) after the venv's own site-packages.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, venv / "bin" / "metis-hf", dist


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_sdist_and_wheel_carry_the_card_templates(installed):
    _, _, dist = installed
    (wheel,) = dist.glob("metis_hf-*.whl")
    (sdist,) = dist.glob("metis_hf-*.tar.gz")
    wheel_names = set(zipfile.ZipFile(wheel).namelist())
    sdist_names = {Path(*Path(n).parts[1:]).as_posix() for n in tarfile.open(sdist).getnames()}
    for template in TEMPLATES:
        assert f"metis_hf/model_cards/{template}" in wheel_names
        assert f"metis_hf/model_cards/{template}" in sdist_names
    assert "metis_hf/resources/offline_default.yaml" in wheel_names


def test_installed_wheel_merges_and_renders_every_card_outside_the_checkout(installed, tmp_path):
    python, script, _ = installed
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(make_tiny_model(64), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.save_pretrained(tmp_path / f"adapter{seed}")
        folders.append(str(tmp_path / f"adapter{seed}"))
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": f} for f in folders]}))
    merged = subprocess.run(
        [str(script), "merge", str(config), "out"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "merge_method: ties" in (tmp_path / "out" / "README.md").read_text()
    cards = subprocess.run(
        [str(python), "-c", RENDER_EVERY_CARD], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True
    )
    assert cards.returncode == 0, cards.stderr[-2000:]
    for kind in ("adapter", "model", "comparison"):
        assert "ties" in (tmp_path / f"card-{kind}" / "README.md").read_text()
