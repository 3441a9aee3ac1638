"""The bars a verdict claim must clear: data that computes the verdict and states itself.

`AtLeast(2.0).holds(2.3)` decides; `.text` ("≥ 2") goes in the table (shared/claims.py). Plain
numbers are judged by Above, AtLeast, Below, AtMost, Equals, Between and Within; a timing ratio
(`bench.ratio`, a bootstrap interval) only by IntervalAbove or IntervalBelow, which read its
interval, so a timing verdict can never rest on one median.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import ClassVar

from shared.bench import Ratio


def format_number(x: float) -> str:
    """Four significant digits, as the table prints numbers."""
    return f"{x:.4g}"


@dataclass(frozen=True)
class Criterion:
    """A bar for a verdict claim: `holds(value)` decides, `text` states it in the table. A
    `label` says what the bar is when the number alone does not (e.g. "half of standard's")."""
    label: str = field(default="", kw_only=True)

    def holds(self, value: float | Ratio) -> bool:
        if isinstance(value, Ratio):
            raise TypeError(f"{type(self).__name__} judges a number; a timing Ratio is judged "
                            "on its interval: use IntervalAbove or IntervalBelow")
        return bool(self._holds(float(value)))

    @property
    def text(self) -> str:
        return f"{self._text()} ({self.label})" if self.label else self._text()


@dataclass(frozen=True)
class _Bar(Criterion):
    bar: float
    op: ClassVar[str]

    def _holds(self, v: float) -> bool:
        return _OPS[self.op](v, self.bar)

    def _text(self) -> str:
        return f"{self.op} {format_number(self.bar)}"


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Above(_Bar):
    op = ">"


class AtLeast(_Bar):
    op = ">="


class Below(_Bar):
    op = "<"


class AtMost(_Bar):
    op = "<="


@dataclass(frozen=True)
class Equals(Criterion):
    """Exactly: for counted quantities (bytes, launches, microbatches), not for timings."""
    target: float

    def _holds(self, v: float) -> bool:
        return v == self.target

    def _text(self) -> str:
        return f"= {format_number(self.target)} exactly"


@dataclass(frozen=True)
class Between(Criterion):
    low: float
    high: float

    def __post_init__(self):
        if not self.low <= self.high:
            raise ValueError(f"Between needs low <= high, got {self.low}, {self.high}")

    def _holds(self, v: float) -> bool:
        return self.low <= v <= self.high

    def _text(self) -> str:
        return f"in [{format_number(self.low)}, {format_number(self.high)}]"


@dataclass(frozen=True)
class Within(Criterion):
    """|value - target| <= rel·|target| or <= abs: `Within(1.3, rel=0.1)`, `Within(0, abs=1e-5)`."""
    target: float
    rel: float | None = None
    abs: float | None = None

    def __post_init__(self):
        if (self.rel is None) == (self.abs is None):
            raise ValueError("Within needs exactly one of rel= or abs=")
        if (self.rel if self.rel is not None else self.abs) < 0:
            raise ValueError(f"Within's tolerance must be >= 0, got rel={self.rel} abs={self.abs}")

    def _holds(self, v: float) -> bool:
        tol = self.rel * abs(self.target) if self.rel is not None else self.abs
        return abs(v - self.target) <= tol

    def _text(self) -> str:
        if self.rel is not None:
            return f"within {self.rel * 100:.3g}% of {format_number(self.target)}"
        return f"within ±{format_number(self.abs)} of {format_number(self.target)}"


@dataclass(frozen=True)
class _IntervalBar(Criterion):
    bar: float = 1.0
    side: ClassVar[str]

    def holds(self, value: Ratio) -> bool:
        if not isinstance(value, Ratio):
            raise TypeError(f"{type(self).__name__} reads an interval: measured must be a "
                            f"bench.Ratio (bench.ratio of two timings), got {type(value).__name__}")
        return value.low > self.bar if self.side == "above" else value.high < self.bar

    def _text(self) -> str:
        op = ">" if self.side == "above" else "<"
        bar = format_number(self.bar)
        return f"{op} {bar} with 95% confidence (interval {self.side} {bar})"


class IntervalAbove(_IntervalBar):
    """A timing ratio > bar with 95% confidence: the interval's lower bound is above bar."""
    side = "above"


class IntervalBelow(_IntervalBar):
    """A timing ratio < bar with 95% confidence: the interval's upper bound is below bar."""
    side = "below"
