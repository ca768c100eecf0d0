"""Per-sample measures split by correctness: streaming moments of each measure over the correct and the incorrect
predictions, and the difference and effect size between the two groups (the report's "what separates right from
wrong" table)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = ["GroupStatistics"]


class _MomentsSummary(TypedDict):
    n: int
    mean: float | None
    std: float | None


@dataclass
class _Moments:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values: Sequence[float]) -> None:
        for value in values:
            if value is None or not math.isfinite(value):
                continue
            self.count += 1
            self.total += value
            self.total_sq += value * value

    def merge(self, other: _Moments) -> None:
        """Add ``other``'s sums (another rank's, for example) to these."""
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq

    def summary(self) -> _MomentsSummary:
        if not self.count:
            return {"n": 0, "mean": None, "std": None}
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return {"n": self.count, "mean": mean, "std": math.sqrt(var)}


@dataclass
class GroupStatistics:
    """Streamed sums of every per-sample measure, overall and for correct and incorrect predictions."""

    measures: dict[str, dict[str, _Moments]] = field(default_factory=dict)

    def add(self, name: str, values: Sequence[float], correct: Sequence[bool]) -> None:
        groups = self.measures.setdefault(name, {"all": _Moments(), "correct": _Moments(), "incorrect": _Moments()})
        groups["all"].add(values)
        groups["correct"].add([v for v, c in zip(values, correct, strict=False) if c])
        groups["incorrect"].add([v for v, c in zip(values, correct, strict=False) if not c])

    def merge(self, other: GroupStatistics) -> None:
        """Add ``other``'s sufficient statistics (count, sum, sum of squares per measure and group) to these: the
        result is that of one instance fed both streams (up to float summation order). Measures new to this one
        are appended in ``other``'s order."""
        for name, groups in other.measures.items():
            mine = self.measures.setdefault(name, {"all": _Moments(), "correct": _Moments(), "incorrect": _Moments()})
            for key, moments in groups.items():
                mine.setdefault(key, _Moments()).merge(moments)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per measure: ``all``/``correct``/``incorrect`` (n, mean, std), ``difference`` (correct minus
        incorrect mean) and ``effect_size`` (that difference over the pooled standard deviation, Cohen's d)."""
        out: dict[str, dict[str, Any]] = {}
        for name, groups in self.measures.items():
            s = {key: moments.summary() for key, moments in groups.items()}
            c, i = s["correct"], s["incorrect"]
            difference = effect = None
            if c["mean"] is not None and i["mean"] is not None:
                difference = c["mean"] - i["mean"]
                assert c["std"] is not None and i["std"] is not None  # set together with the mean
                nc, ni = c["n"], i["n"]
                pooled = math.sqrt(((nc * c["std"] ** 2) + (ni * i["std"] ** 2)) / max(nc + ni, 1))
                effect = difference / pooled if pooled > 0 else None
            out[name] = {**s, "difference": difference, "effect_size": effect}
        return out


# ---------------------------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------------------------
