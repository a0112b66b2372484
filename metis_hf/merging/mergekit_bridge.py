"""Both directions between our registry and mergekit's (mergekit >= 0.1.5, an optional extra).

* ``register_with_mergekit()`` adds every method of our registry that mergekit lacks (``metis``,
  ``metis_robust``, ``consensus_ta``, and any registered later) to mergekit's registry, built from
  its registry entry, so YAML configs can say ``merge_method: metis``. mergekit has no plugin
  discovery, so this must run in the process that runs mergekit (``metis-hf mergekit-yaml`` does).
* ``merge("mergekit:<name>", task_vectors, ...)`` runs any mergekit method on our task vectors
  (zero base, so each task vector is the input's delta).

mergekit is LGPL-3.0: it is imported here, never copied.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import torch

from metis_hf.merging.registry import MergeMethod, available_methods, get_merge_method


def _import_mergekit():
    try:
        import mergekit.merge_methods as merge_methods
    except ImportError as err:
        raise ImportError(
            "mergekit integration needs `pip install 'metis-hf[mergekit]'` (mergekit>=0.1.5)."
        ) from err
    return merge_methods


def _mergekit_method(method: MergeMethod):
    """``method`` as a mergekit group method: our merge of the group's deltas to its base, plus
    the base. Per-task parameters become per-model ones under their merge-YAML key (``loss_gaps``
    -> ``loss_gap``, required: mergekit has no validation data to measure gaps on); the others
    keep their name, type and default."""
    from mergekit.merge_methods.base import (
        MISSING,
        BasePolicy,
        FunctionalGroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        ParameterSpec,
    )

    hints = typing.get_type_hints(method.function)
    per_model = {key: name for name, key in method.per_task.items() if name != "seed"}
    specs = []
    for name in method.parameters:
        if name in method.per_task and name != "seed":
            default = MISSING if name == "loss_gaps" else None
            specs.append(ParameterSpec(method.per_task[name], float | None, ParameterScope.NON_BASE, default))
        else:
            default = method.defaults.get(name, MISSING)
            specs.append(ParameterSpec(name, hints.get(name, Any), ParameterScope.SHARED, default))

    def merge_group(group, **values: Any) -> torch.Tensor:
        params = {}
        for key, value in values.items():
            if key not in per_model:
                params[key] = value
                continue
            given = value.values_for(group.non_base)
            if all(v is None for v in given):
                continue  # no model sets it: the method's default
            if any(v is None for v in given):
                raise ValueError(f"{method.name}: {key!r} is set for some models but not all.")
            params[per_model[key]] = given
        base = group.base.tensor
        task_vectors = [entry.tensor.float() - base.float() for entry in group.non_base]
        return (base.float() + method(task_vectors, **params)).to(base.dtype)

    merge_group.metis_hf_method = method.name
    spec = MergeMethodSpec(
        name=method.name,
        parameters=tuple(specs),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        pretty_name=method.pretty_name,
        reference_url=method.reference_url,
    )
    return FunctionalGroupMergeMethod(spec, merge_group)


def register_with_mergekit() -> list[str]:
    """Register every method of our registry whose name mergekit does not use for its own into
    mergekit's registry (once per process; a method registered later is added by the next call).
    Returns the names that are ours there."""
    merge_methods = _import_mergekit()
    existing = {m.spec.name: m for m in merge_methods.registered_methods()}
    ours = []
    for name in available_methods():
        if name in existing:
            if getattr(getattr(existing[name], "implementation", None), "metis_hf_method", None) == name:
                ours.append(name)
            continue  # mergekit's own (task_arithmetic, ties, dare_*): its version runs
        merge_methods.register(_mergekit_method(get_merge_method(name)))
        ours.append(name)
    return ours


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
