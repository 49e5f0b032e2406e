"""Verdicts where the numbers need reading: is a run balanced, have its weights converged.

Balance (paper section 3: GradNorm pulls the gradient norms G_i to a common scale): the spread of the G_i
across tasks (coefficient of variation) at the end of the run against ``BALANCED_CV``, and its trend from
the start. Convergence (paper 5.2, 5.3: the time average E_t[w_i] is what one retrains with): the largest
relative drift of E_t[w_i] between the two halves of the averaging window against ``CONVERGED_DRIFT``.
"""

from __future__ import annotations

import math
from typing import Optional

#: G_i spread (CV across tasks) at or below which the norms count as balanced.
BALANCED_CV = 0.2
#: A spread that fell (or rose) by more than this fraction from start to end is a trend, not noise.
TREND = 0.2
#: E_t[w_i] drift between the window's halves at or below which the weights count as converged.
CONVERGED_DRIFT = 0.05


def _finite(value: Optional[float]) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def balance_state(cv_start: Optional[float], cv_end: Optional[float]) -> tuple[str, Optional[float]]:
    """("balanced" | "balancing" | "not balanced" | "spreading" | "unknown", relative change of the G_i
    spread from start to end). Balanced: the end spread at most ``BALANCED_CV``; otherwise balancing
    when it fell by more than ``TREND``, spreading when it rose by more than ``TREND``."""
    if not _finite(cv_end):
        return "unknown", None
    assert cv_end is not None
    change = (cv_end - cv_start) / cv_start if _finite(cv_start) and cv_start else None
    if cv_end <= BALANCED_CV:
        return "balanced", change
    if change is not None and change < -TREND:
        return "balancing", change
    if change is not None and change > TREND:
        return "spreading", change
    return "not balanced", change


def balance_verdict(cv_start: Optional[float], cv_end: Optional[float]) -> str:
    """The state with its figures, in words."""
    state, change = balance_state(cv_start, cv_end)
    if state == "unknown":
        return "unknown (no gradient norms)"
    trend = "" if change is None else f", {change:+.0%} since the start"
    relation = "<=" if state == "balanced" else ">"
    return f"{state} (G_i spread {cv_end:.2f} {relation} {BALANCED_CV}{trend})"


def converged(drift: Optional[float]) -> Optional[bool]:
    """Whether E_t[w_i] drifted by at most ``CONVERGED_DRIFT``; None where the drift is unknown."""
    return None if not _finite(drift) else bool(abs(float(drift)) <= CONVERGED_DRIFT)  # type: ignore[arg-type]


def convergence_verdict(drift: Optional[float]) -> str:
    state = converged(drift)
    if state is None:
        return "unknown"
    assert drift is not None
    return f"{'converged' if state else 'not converged'} (drift {drift:.1%} {'<=' if state else '>'} {CONVERGED_DRIFT:.0%})"
