"""mergekit's YAML runner with metis-hf's methods registered: ``metis-hf mergekit-yaml``."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml

from metis_hf.merging.mergekit_bridge import check_mergekit_config, register_with_mergekit


def run_mergekit_yaml(config_path: str, output_dir: str, mergekit_args: Sequence[str] = ()) -> None:
    """mergekit's YAML runner with our methods registered, the config checked first, and no
    output folder left behind by a failed run that created it."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    register_with_mergekit()
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path}: not valid YAML: {err}") from err
    check_mergekit_config(data)
    existed = os.path.exists(output_dir)
    with tempfile.TemporaryDirectory(prefix="metis-hf-mergekit-") as scratch:
        # mergekit takes `fx/ft1` (no ./) for a Hub id when it writes the card, after the merge:
        # local folders go to it as absolute paths.
        resolved = os.path.join(scratch, "config.yaml")
        with open(resolved, "w", encoding="utf-8") as handle:
            yaml.safe_dump(_local_models_absolute(data), handle, sort_keys=False)
        try:
            mergekit_yaml.main(args=[resolved, output_dir, *mergekit_args], standalone_mode=False)
        except BaseException:
            if not existed:
                shutil.rmtree(output_dir, ignore_errors=True)
            raise


def _local_models_absolute(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a mergekit config whose model references that name existing local folders
    (``path`` or ``path+lora``) are absolute."""

    def absolute(reference: Any) -> Any:
        if not isinstance(reference, str):
            return reference
        model, plus, lora = reference.partition("+")
        parts = [model, lora] if plus else [model]
        fixed = [os.path.abspath(p) if os.path.isdir(p) else p for p in parts]
        return "+".join(fixed)

    def fix(entry: Any) -> None:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = absolute(entry["model"])

    data = copy.deepcopy(data)
    if "base_model" in data:
        data["base_model"] = absolute(data["base_model"])
    for entry in data.get("models") or []:
        fix(entry)
    for entry in data.get("slices") or []:
        for source in (entry or {}).get("sources") or []:
            fix(source)
    return data
