"""``scale: auto``: the merge scale with the lowest validation loss, searched over a fixed grid
that widens past an edge that wins. Post-hoc merges search it once; many-shot merges of round
updates search it every round. The loss is the caller's: this module only chooses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

AUTO = "auto"
# The parameters that multiply a method's result last (TIES's, DARE's and the sums' scale; METIS's
# beta): the ones `auto` may stand for.
SCALE_PARAMETERS = ("scale", "beta")


def searched_scale(params: dict) -> str | None:
    """The name of the scale parameter set to ``auto`` in ``params``, if any."""
    return next((name for name in SCALE_PARAMETERS if params.get(name) == AUTO), None)


# `scale: auto`: the candidates tried on the validation loss (the Iso-C and TSV-M authors
# search 0.1 to 3.0 on validation data), widened past an edge that wins (search_scale).
SCALE_CANDIDATES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
SCALE_WIDENING = 1.5
SCALE_MAX_EXTRA = 6


def search_scale(
    loss_at: Callable[[float], float],
    candidates: Sequence[float] = SCALE_CANDIDATES,
    widening: float = SCALE_WIDENING,
    max_extra: int = SCALE_MAX_EXTRA,
) -> tuple[float, dict[float, float]]:
    """The candidate scale with the lowest ``loss_at`` (a diverged, non-finite loss never wins),
    and every candidate's loss. Where the best is the largest or the smallest candidate tried, the
    search goes on past it by a factor ``widening`` until the loss rises, ``max_extra`` candidates
    at most: a minimum on the edge of the range may lie beyond it (Iso-C's often does)."""

    def key(scale: float) -> float:
        return losses[scale] if math.isfinite(losses[scale]) else math.inf

    losses = {float(c): float(loss_at(float(c))) for c in candidates}
    for _ in range(max_extra):
        best = min(losses, key=key)
        if best == max(losses):
            beyond = round(best * widening, 6)
        elif best == min(losses):
            beyond = round(best / widening, 6)
        else:
            break
        losses[beyond] = float(loss_at(beyond))
    best = min(losses, key=key)
    if best in (max(losses), min(losses)):
        logger.warning(f"scale search: the best scale, {best:g}, is still the edge of those tried.")
    return best, losses
