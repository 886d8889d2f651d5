"""Metric helpers: unbiased pass@k, standard errors, answer extraction."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as a running product, which stays exact in floating point where the binomials would overflow.
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) variance, as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(s: str) -> str:
    """'1,234.50' → '1234.5', '$18' → '18', '7.0' → '7', '-3.' → '-3' (exact-match form of GSM8K answers)."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def last_number(text: str) -> str | None:
    """The last number in `text`, normalized; None when there is none (GSM8K's final-number extraction)."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of `stops` (generation may run past a stop string by a few characters)."""
    end = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    return text[:end]
