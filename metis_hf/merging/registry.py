"""One registry of merge methods, and ``merge(name, task_vectors, **params)``.

A method is a plain function ``fn(task_vectors, *, <typed keyword parameters>) -> Tensor`` over T
same-shape task vectors (logically stacked on a new first axis; passed as a sequence so that no
T-fold copy is made). ``merge`` checks the inputs and rejects parameters the method does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from metis_hf.merging.checks import check_task_vectors

MergeFunction = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: MergeFunction
    parameters: tuple[str, ...]
    summary: str

    def __call__(self, task_vectors: Sequence[torch.Tensor], **params) -> torch.Tensor:
        unknown = sorted(set(params) - set(self.parameters))
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
        probe = [torch.linspace(-1.0, 1.0, 8) * (t + 1) for t in range(num_tasks)]
        self(probe, **params)


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, *, overwrite: bool = False) -> Callable[[MergeFunction], MergeFunction]:
    """Decorator that registers ``fn`` under ``name``::

    @register_merge_method("my_mean")
    def my_mean(task_vectors, *, scale: float = 1.0):
        return scale * torch.stack(task_vectors).mean(0)
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
        params = tuple(p.name for p in list(signature.parameters.values())[1:] if p.kind is p.KEYWORD_ONLY)
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _METHODS[name] = MergeMethod(name, fn, params, summary)
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
