"""How a figure is written for a reader: the one number format of the run's report (dpsel.report), the flows'
summaries and artifacts (flows/) and the demo's headline (dpsel.demo). Imports nothing of dpsel, so any layer
may use it. (Signed margins, `+0.0833`, are a different figure: the demo writes those itself.)"""
from __future__ import annotations

import math
from numbers import Integral, Real

SIGNIFICANT_DIGITS = 4
PLAIN_BELOW = 1e4   # larger figures (seconds of a long run, row counts as floats) are written whole, no exponent


def format_figure(value) -> str:
    """None or NaN -> "n/a"; a real number -> 4 significant digits (0.8333, 0.7, 12.35), whole from 10^4 up
    (123457, never 1.235e+05); an integer or anything else -> str(value)."""
    if isinstance(value, Integral) or not isinstance(value, Real):
        return "n/a" if value is None else str(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{SIGNIFICANT_DIGITS}g}" if abs(value) < PLAIN_BELOW else f"{value:.0f}"
