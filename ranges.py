"""Allowed ranges of numeric options (issue 21): one :class:`Range` per option, checked the same
way whether the value came from the command line (``Ranged``, a click type), a ``--config`` file or
a pipeline file (``check_ranges``), with one ``error: --lr -1 must be greater than 0`` line.

A maximum is set where a larger value is nonsense or would allocate without bound (sizes, queue,
workers); NaN is always refused, infinity wherever a maximum is set. Each command keeps its table
next to its config: ``distill/config.py``, ``extract/config.py``, ``evaluate/option_ranges.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import click

from .errors import HgkdError

SEED_MAX = 2**32 - 1  # numpy's seeds
WORKERS_MAX = 256  # processes: more is a fork bomb on any machine
IMG_SIZE_MAX = 4096  # pixels per side of a view


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``low_open``/``high_open``: strict); None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        """``must be at least 1``, ... or None when ``value`` is allowed."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {kind}"
        if self.integer and not float(value).is_integer():
            return f"must be {kind}"
        if math.isnan(value):
            return f"must be {kind}, not NaN"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'greater than' if self.low_open else 'at least'} {_num(self.low)}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'less than' if self.high_open else 'at most'} {_num(self.high)}"
        return None

    def check(self, label: str, value: Any) -> None:
        """One HgkdError line ``<label> <value> must be ...`` when ``value`` is outside the range."""
        problem = self.problem(value)
        if problem and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HgkdError(f"{label} expected {'an integer' if self.integer else 'a number'}, got {value!r}")
        if problem:
            raise HgkdError(f"{label} {value} {problem}")


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def at_least(low: float, high: float | None = None, integer: bool = True) -> Range:
    return Range(low, high, integer=integer)


def positive(high: float | None = None, integer: bool = False) -> Range:
    """``(0, high]``: a rate, a temperature, a scale."""
    return Range(0, high, low_open=True, integer=integer)


SEED = at_least(0, SEED_MAX)
WORKERS = at_least(0, WORKERS_MAX)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): a mask ratio, a momentum


def check_ranges(values: Mapping[str, Any], ranges: Mapping[str, Range], label: Callable[[str], str]) -> None:
    """Every value of ``values`` with a range (None: not given) against it; ``label(key)`` names it."""
    for key, value in values.items():
        if key in ranges and value is not None:
            ranges[key].check(label(key), value)


def option_label(key: str) -> str:
    """``queue_size`` -> ``--queue-size``."""
    return f"--{key.replace('_', '-')}"


class OptionError(click.BadParameter):
    """A bad option value as the house's one line (``error: ...``, exit code 2), not click's usage block."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class Ranged(click.ParamType):
    """A click option type: a number inside ``rng``; anything else is one line naming the option."""

    def __init__(self, rng: Range) -> None:
        self.rng = rng
        self.name = "integer" if rng.integer else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        label = param.opts[0] if param is not None and param.opts else "value"
        number = value
        if isinstance(value, str):
            try:
                number = int(value) if self.rng.integer else float(value)
            except ValueError:
                raise OptionError(f"{label} {value!r} must be {'an integer' if self.rng.integer else 'a number'}") \
                    from None
        problem = self.rng.problem(number)
        if problem:
            raise OptionError(f"{label} {value} {problem}")
        return number

    def __repr__(self) -> str:
        return f"Ranged({self.rng})"
