"""Both directions between our registry and mergekit's (mergekit >= 0.1.5, an optional extra).

* ``register_with_mergekit()`` adds ``metis``, ``metis_robust`` and ``consensus_ta`` to mergekit's
  registry, so its YAML configs can say ``merge_method: metis``. mergekit has no plugin discovery,
  so this must run in the process that runs mergekit (``metis-hf mergekit-yaml`` does). Idempotent.
* ``merge("mergekit:<name>", task_vectors, ...)`` runs any mergekit method on our task vectors
  (zero base, so each task vector is the input's delta).

mergekit is LGPL-3.0: it is imported here, never copied.
"""

# No `from __future__ import annotations`: mergekit reads these kernels' annotations at runtime.

from collections.abc import Sequence
from typing import Any

import torch

from metis_hf.merging.registry import MergeMethod, merge

MERGEKIT_METHODS = ("metis", "metis_robust", "consensus_ta")
_PAPER_URL = "https://arxiv.org/abs/2606.16501"


def _import_mergekit():
    try:
        import mergekit.merge_methods as merge_methods
    except ImportError as err:
        raise ImportError(
            "mergekit integration needs `pip install 'metis-hf[mergekit]'` (mergekit>=0.1.5)."
        ) from err
    return merge_methods


def _build_methods() -> list:
    merge_methods = _import_mergekit()
    from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
    from mergekit.merge_methods.easy_define import merge_method

    contract = InputContract(base=BasePolicy.REQUIRED, min_non_base=1)

    def merge_group(group: TensorGroup, method: str, **params) -> torch.Tensor:
        """Our ``method`` on the group's deltas to its base, plus the base. k above the input count
        is an error (as in ``metis-hf merge``), not capped."""
        base = group.base.tensor
        task_vectors = [entry.tensor.float() - base.float() for entry in group.non_base]
        return (base.float() + merge(method, task_vectors, **params)).to(base.dtype)

    @merge_method(name="metis", pretty_name="METIS", reference_url=_PAPER_URL, contract=contract)
    def metis_kernel(
        group: TensorGroup,
        loss_gap: PerNonBase[float],  # required: uniform weights are not METIS
        temperature: float = 2.0,
        delta: float = 0.3,
        k: int = 2,
        beta: float = 1.0,
    ) -> torch.Tensor:
        return merge_group(
            group,
            "metis",
            loss_gaps=loss_gap.values_for(group.non_base),
            temperature=temperature,
            delta=delta,
            k=k,
            beta=beta,
        )

    @merge_method(
        name="metis_robust",
        pretty_name="METIS, robust weights and mask (metis-hf)",
        reference_url=_PAPER_URL,
        contract=contract,
    )
    def metis_robust_kernel(
        group: TensorGroup,
        loss_gap: PerNonBase[float],
        reference_loss: PerNonBase[float] = 1.0,  # 1: the gaps are used as given
        gap_normalization: str = "relative",  # checked by robust_weights, which names it
        temperature: float = -1.0,  # negative: the normalization's default (0.1 relative, 1 standardized)
        floor: float = -1.0,  # negative: metis_robust's default, 0.5 / T
        delta: float = 0.3,
        k: int = 2,
        beta: float = 1.0,
    ) -> torch.Tensor:
        return merge_group(
            group,
            "metis_robust",
            loss_gaps=loss_gap.values_for(group.non_base),
            reference_losses=reference_loss.values_for(group.non_base),
            gap_normalization=gap_normalization,
            temperature=None if temperature < 0 else temperature,
            floor=None if floor < 0 else floor,
            delta=delta,
            k=k,
            beta=beta,
        )

    @merge_method(
        name="consensus_ta",
        pretty_name="Consensus Task Arithmetic (TALL masks)",
        reference_url="https://arxiv.org/abs/2405.07813",
        contract=contract,
    )
    def consensus_kernel(
        group: TensorGroup,
        weight: PerNonBase[float] = 1.0,
        delta: float = 0.3,
        k: int = 2,
        scale: float = 1.0,
    ) -> torch.Tensor:
        return merge_group(
            group, "consensus_ta", weights=weight.values_for(group.non_base), delta=delta, k=k, scale=scale
        )

    del merge_methods
    return [metis_kernel, metis_robust_kernel, consensus_kernel]


def register_with_mergekit() -> list[str]:
    """Register our methods into mergekit's registry once per process; returns their names."""
    merge_methods = _import_mergekit()
    existing = {m.spec.name: m for m in merge_methods.registered_methods()}
    for method in _build_methods():
        name = method.spec.name
        if name in existing:
            # Ours from an earlier call (same pretty name) is fine; someone else's is a clash.
            if existing[name].spec.pretty_name != method.spec.pretty_name:
                raise ValueError(f"mergekit already has a different method named {name!r}.")
            continue
        merge_methods.register(method)
    return list(MERGEKIT_METHODS)


def check_mergekit_config(data: Any) -> None:
    """What mergekit's runner would ignore or report with a traceback, as one clear error: an
    unknown method, and parameter names the method does not take (mergekit drops misspelt ones)."""
    merge_methods = _import_mergekit()
    if not isinstance(data, dict):
        raise ValueError(f"a mergekit config is a mapping, got {type(data).__name__}.")
    name = data.get("merge_method")
    if name not in mergekit_method_names():
        raise ValueError(
            f"merge_method: unknown method {name!r}; mergekit has: {', '.join(mergekit_method_names())}."
        )
    known = {p.name for p in merge_methods.get(name).spec.parameters}
    places = [("parameters", data.get("parameters"))]
    for key in ("models", "slices"):
        for i, entry in enumerate(data.get(key) or []):
            places.append((f"{key}[{i}].parameters", (entry or {}).get("parameters")))
            for j, source in enumerate((entry or {}).get("sources") or []):
                places.append((f"{key}[{i}].sources[{j}].parameters", (source or {}).get("parameters")))
    for where, params in places:
        for param in params or {}:
            if param not in known:
                raise ValueError(
                    f"{where}.{param}: {name} has no such parameter (it takes: {', '.join(sorted(known))})."
                )
    shared = data.get("parameters") or {}
    for spec in merge_methods.get(name).spec.parameters:
        if spec.required and spec.name not in shared:
            per_model = [(w, p) for w, p in places if w.startswith("models[") or ".sources[" in w]
            for where, params in per_model or [("parameters", shared)]:
                if spec.name not in (params or {}):
                    raise ValueError(f"{where}: {name} needs {spec.name!r} (for every model).")


def mergekit_method_names() -> list[str]:
    return sorted(m.spec.name for m in _import_mergekit().registered_methods())


def mergekit_merge_method(name: str) -> MergeMethod:
    """A mergekit method as one of ours. Our parameter names map onto mergekit's: ``weights`` ->
    per-input ``weight``, ``scale`` -> ``lambda``; other keywords pass through unchanged."""
    merge_methods = _import_mergekit()
    if name not in mergekit_method_names():
        raise ValueError(
            f"Unknown mergekit method {name!r}; mergekit has: {', '.join(mergekit_method_names())}."
        )
    method = merge_methods.get(name)
    spec_params = tuple(p.name for p in method.spec.parameters)

    def run(task_vectors: Sequence[torch.Tensor], **params: Any) -> torch.Tensor:
        from mergekit.merge_methods import merge_tensors

        parameters = dict(params)
        if "weights" in parameters:
            parameters["weight"] = list(parameters.pop("weights"))
        elif "weight" in spec_params:
            parameters.setdefault("weight", 1.0)
        if "scale" in parameters:
            parameters["lambda"] = parameters.pop("scale")
        base = torch.zeros_like(task_vectors[0])
        if method.spec.contract.base.value in ("required", "optional"):
            return merge_tensors([base, *task_vectors], method, parameters=parameters, base_index=0)
        return merge_tensors(list(task_vectors), method, parameters=parameters)

    accepted = tuple(p for p in spec_params if p not in ("weight", "lambda")) + ("weights", "scale")
    return MergeMethod(f"mergekit:{name}", run, accepted, f"mergekit's {method.spec.pretty_name or name}")


def run_mergekit_yaml(config_path: str, output_dir: str, mergekit_args: Sequence[str] = ()) -> None:
    """mergekit's YAML runner with our methods registered, the config checked first, and no
    output folder left behind by a failed run that created it."""
    import os
    import shutil

    import yaml
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    register_with_mergekit()
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path}: not valid YAML: {err}") from err
    check_mergekit_config(data)
    existed = os.path.exists(output_dir)
    try:
        mergekit_yaml.main(args=[config_path, output_dir, *mergekit_args], standalone_mode=False)
    except BaseException:
        if not existed:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
