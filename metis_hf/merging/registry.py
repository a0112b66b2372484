"""One registry of merge methods, and ``merge(name, task_vectors, **params)``.

A method is a plain function ``fn(task_vectors, *, <typed keyword parameters>) -> Tensor`` over T
same-shape task vectors (logically stacked on a new first axis; passed as a sequence so that no
T-fold copy is made). ``merge`` checks the inputs and rejects parameters the method does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from metis_hf.merging.checks import check_task_vectors

MergeFunction = Callable[..., torch.Tensor]
Operand = Literal["elements", "matrices"]


# Parameters with one value per task, and the per-model key of each in merge YAML files.
PER_TASK_PARAMETERS = {
    "weights": "weight",
    "example_counts": "example_count",
    "loss_gaps": "loss_gap",
    "alphas": "alpha",
    "reference_losses": "reference_loss",
    "base_losses": "base_loss",
    "seed": "seed",  # one integer for all tasks, or one per task
}


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what callers need to know about it.

    ``sums_tasks``: the output is a sum over tasks, so a many-shot run defaults ``scale`` to 1/T
    (in LoRA space a sum multiplies the adapter by about T every round). ``task_weights``: the
    per-task weights a merge with given parameters applies (logged as alpha). ``operates_on``:
    ``"elements"`` (any shape, coordinate by coordinate, so LoRA factors can be merged apart) or
    ``"matrices"`` (each 2-D tensor is a layer's update matrix, as for the SVD methods; needs the
    dense or core space for LoRA adapters). Whether it uses loss gaps, reference losses, example
    counts or a seed follows from its parameters; ``reads_base_losses``: for a method that takes
    ``base_losses`` but reads them only under some settings, which (given its parameters).
    """

    name: str
    function: MergeFunction
    parameters: tuple[str, ...]
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    pretty_name: str = ""
    reference_url: str | None = None
    description: str = ""  # a sentence for model cards
    sums_tasks: bool = False
    task_weights: Callable[[dict[str, Any], int], list[float]] | None = None
    operates_on: Operand = "elements"
    internal: tuple[str, ...] = ()  # keyword-only parameters starting with "_": passed by callers
    reads_base_losses: Callable[[dict[str, Any]], bool] | None = None

    @property
    def uses_loss_gaps(self) -> bool:
        return "loss_gaps" in self.parameters

    @property
    def uses_reference_losses(self) -> bool:
        return "reference_losses" in self.parameters

    @property
    def uses_base_losses(self) -> bool:
        return "base_losses" in self.parameters

    def needs_base_losses(self, params: dict[str, Any]) -> bool:
        """Whether a merge with ``params`` (over the method's defaults) reads the base model's
        losses: callers measure them only then (a validation pass over every task)."""
        if not self.uses_base_losses:
            return False
        return self.reads_base_losses is None or self.reads_base_losses({**self.defaults, **params})

    @property
    def seeded(self) -> bool:
        return "seed" in self.parameters

    @property
    def per_task(self) -> dict[str, str]:
        """Per-task parameter -> its per-model key in merge YAML files."""
        return {p: key for p, key in PER_TASK_PARAMETERS.items() if p in self.parameters}

    def weights_of(self, params: dict[str, Any], count: int) -> list[float]:
        """The per-task weights a merge with ``params`` applies: the method's own rule (given
        ``params`` over the method's defaults), else ``scale * weights``."""
        params = {**self.defaults, **params}
        if self.task_weights is not None:
            return self.task_weights(params, count)
        return [float(params.get("scale", 1.0)) * float(w) for w in (params.get("weights") or [1.0] * count)]

    @property
    def uses_example_counts(self) -> bool:
        return "example_counts" in self.parameters

    def __call__(self, task_vectors: Sequence[torch.Tensor], **params) -> torch.Tensor:
        unknown = sorted(set(params) - set(self.parameters) - set(self.internal))
        if unknown:
            raise ValueError(
                f"Merge method {self.name!r} has no parameter {unknown[0]!r} "
                f"(it takes: {', '.join(self.parameters) or 'none'})."
            )
        return self.function(list(task_vectors), **params)

    def check(self, num_tasks: int, **params) -> None:
        """Raise the error a merge of ``num_tasks`` task vectors with ``params`` would raise, before
        any real data exists: the method's own checks run on tiny probe vectors, so each
        parameter's domain is stated once, in the method."""
        shape = (4, 4) if self.operates_on == "matrices" else (16,)
        probe = [torch.linspace(-1.0, 1.0, 16).reshape(shape) * (t + 1) for t in range(num_tasks)]
        self(probe, **params)


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    pretty_name: str | None = None,
    reference_url: str | None = None,
    description: str | None = None,
    sums_tasks: bool = False,
    task_weights: Callable[[dict[str, Any], int], list[float]] | None = None,
    operates_on: Operand = "elements",
    reads_base_losses: Callable[[dict[str, Any]], bool] | None = None,
    overwrite: bool = False,
) -> Callable[[MergeFunction], MergeFunction]:
    """Decorator that registers ``fn`` under ``name``, with what callers need to know (see
    :class:`MergeMethod`)::

    @register_merge_method("my_mean", pretty_name="Mean", sums_tasks=False)
    def my_mean(task_vectors, *, scale: float = 1.0):
        return scale * torch.stack(task_vectors).mean(0)

    Its keyword-only parameters and their defaults are read from the signature; one whose name is a
    per-task parameter (weights, example_counts, loss_gaps, alphas, reference_losses, base_losses,
    seed) takes one value per task. Keyword-only parameters whose name starts with ``_`` are not user settings: the
    merge spaces pass them (``_full_shape`` for matrix methods merged in the core space).
    """

    def decorate(fn: MergeFunction) -> MergeFunction:
        if name in _METHODS and not overwrite:
            raise ValueError(
                f"Merge method {name!r} is already registered (pass overwrite=True to replace it)."
            )
        if name.startswith("mergekit:"):
            raise ValueError(
                "The 'mergekit:' prefix is reserved for methods looked up in mergekit's registry."
            )
        signature = inspect.signature(fn)
        keyword = [p for p in list(signature.parameters.values())[1:] if p.kind is p.KEYWORD_ONLY]
        internal = tuple(p.name for p in keyword if p.name.startswith("_"))
        keyword = [p for p in keyword if p.name not in internal]
        params = tuple(p.name for p in keyword)
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _METHODS[name] = MergeMethod(
            name,
            fn,
            params,
            summary,
            defaults={p.name: p.default for p in keyword if p.default is not p.empty},
            pretty_name=pretty_name or name,
            reference_url=reference_url,
            description=description or summary,
            sums_tasks=sums_tasks,
            task_weights=task_weights,
            operates_on=operates_on,
            internal=internal,
            reads_base_losses=reads_base_losses,
        )
        return fn

    return decorate


def available_methods(include_mergekit: bool = False) -> list[str]:
    """Names accepted by :func:`merge`; with ``include_mergekit``, mergekit's methods too."""
    names = sorted(_METHODS)
    if include_mergekit:
        from metis_hf.merging.mergekit_bridge import mergekit_method_names

        names += [f"mergekit:{n}" for n in mergekit_method_names()]
    return names


def get_merge_method(name: str) -> MergeMethod:
    if name.startswith("mergekit:"):
        from metis_hf.merging.mergekit_bridge import mergekit_merge_method

        return mergekit_merge_method(name.removeprefix("mergekit:"))
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown merge method {name!r}; available: {', '.join(sorted(_METHODS))} "
            "(and 'mergekit:<name>' for mergekit's methods)."
        ) from None


def merge(
    name: str, task_vectors: Sequence[torch.Tensor], *, check_finite: bool = True, **params
) -> torch.Tensor:
    """Merge same-shape task vectors with the registered method ``name``.

    Raises ``ValueError`` for no inputs, mismatched shapes, non-finite entries (unless
    ``check_finite=False``), an unknown method, or parameters the method does not take.
    """
    method = get_merge_method(name)
    vectors = check_task_vectors(task_vectors, check_finite=check_finite)
    return method(vectors, **params)
