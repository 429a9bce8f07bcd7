"""Types and ranges of config values: each `Spec` parses a value (text from `--set`, or what YAML gave) into
its field's type, or refuses it with a reason and a description of what is allowed.

Booleans come only from true/false/yes/no/1/0 (so ``maybe`` is refused rather than being a truthy string);
numbers are parsed or refused (``abc`` is not a weight decay) and must be finite and in range. The table
that maps every config field to its spec is `dcal.config.SCHEMA`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Spec", "Bool", "Int", "Number", "Str", "Choice", "Nullable", "Mapping", "PathOrBool", "FloatOrList",
           "Pair", "parse_scalar", "TRUE_WORDS", "FALSE_WORDS", "NULL_WORDS"]

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
NULL_WORDS = ("null", "none", "~")


def parse_scalar(text: str) -> Any:
    """YAML, except that numbers YAML 1.1 leaves as strings (``5e-4``) are numbers (for free-form mappings)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from e


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML ({e})") from e


class Spec:
    """A field's type and range. `parse` returns the normalised value or raises ValueError(reason)."""

    allowed: str = "any value"

    def parse(self, value: Any) -> Any:
        return value

    def check(self, key: str, value: Any) -> Any:
        """`parse`, with a refusal turned into a ConfigError naming the key, the value and what is allowed."""
        try:
            return self.parse(value)
        except ValueError as e:
            raise ConfigError(f"{key}={value!r} is not allowed ({e}); allowed: {self.allowed}") from None


class Bool(Spec):
    allowed = "true/false/yes/no/1/0"

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ValueError("not a boolean")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return False
    return not (hi is not None and (v > hi or (hi_open and v == hi)))


class Number(Spec):
    """A finite float in a range. Args: lo, hi bounds (None: unbounded); lo_open/hi_open exclude them."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.allowed = f"a finite number {_range_text(lo, hi, lo_open, hi_open)}".rstrip()

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("not a number")
        try:
            v = float(value)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(v):
            raise ValueError("not finite")
        if not _in_range(v, self.lo, self.hi, self.lo_open, self.hi_open):
            raise ValueError("out of range")
        return v


class Int(Spec):
    """An integer >= `lo` (and <= `hi` when given)."""

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer {_range_text(lo, hi, False, False)}".rstrip()

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("not an integer")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError("not an integer") from None
        if not isinstance(value, int):
            raise ValueError("not an integer")
        if not _in_range(value, self.lo, self.hi, False, False):
            raise ValueError("out of range")
        return value


class Str(Spec):
    allowed = "a non-empty string"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("not a non-empty string")
        return value


class Choice(Spec):
    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(choices)
        self.allowed = "one of " + ", ".join(self.choices)

    def parse(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError("not one of the choices")
        return value


class Nullable(Spec):
    """None (``null``/``none``/``~`` in text) or what `inner` allows."""

    def __init__(self, inner: Spec):
        self.inner = inner
        self.allowed = f"null or {inner.allowed}"

    def parse(self, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            return None
        return self.inner.parse(value)


class Mapping(Spec):
    """A mapping (text is parsed as YAML, e.g. ``{depth: 6}``); its keys are checked where it is used."""

    allowed = "a mapping, e.g. {key: value}"

    def parse(self, value: Any) -> dict:
        if isinstance(value, str):
            value = _yaml(value)
        if not isinstance(value, dict):
            raise ValueError("not a mapping")
        return value


class PathOrBool(Spec):
    """`model.pretrained`: a boolean (timm's own weights or none) or the path of a local checkpoint."""

    allowed = "true/false/yes/no/1/0 or the path of a local timm checkpoint"

    def parse(self, value: Any) -> bool | str:
        try:
            return Bool().parse(value)
        except ValueError:
            pass
        if hasattr(value, "__fspath__"):
            value = str(value)
        return Str().parse(value)


def _numbers(value: Any, n: int | None) -> list[float]:
    if isinstance(value, str):
        value = _yaml(value)
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
        raise ValueError("not a list" + (f" of {n} numbers" if n is not None else " of numbers"))
    return [Number().parse(v) for v in value]


class FloatOrList(Spec):
    """A finite number, or a list of finite numbers (one per branch)."""

    allowed = "a finite number or a list of finite numbers, e.g. [0, 0, 0]"

    def parse(self, value: Any) -> float | list[float]:
        if isinstance(value, (list, tuple)) or (isinstance(value, str) and value.strip().startswith("[")):
            return _numbers(value, None)
        return Number().parse(value)


class Pair(Spec):
    """[low, high], two finite numbers with low < high."""

    allowed = "[low, high] with low < high"

    def parse(self, value: Any) -> list[float]:
        lo, hi = _numbers(value, 2)
        if not lo < hi:
            raise ValueError("low is not < high")
        return [lo, hi]
