"""Settings as values: options objects read from a config section by name, and value checks.

An options object (`meta.MetaOptions`, `dcd.DCDOptions`, `objective.ObjectiveOptions`) is a
frozen dataclass whose field names are those of its config section: `from_section` fills it with
no field copied by hand, so a new option is its config default, its field and the code that
reads it. Frozen, it hashes, and a jitted function can take it as a static argument.

A check maps one value to None (fine) or the rest of a sentence ("must be >= 1, got 0"). Each
method lists the rules of its own config section beside its `default_config()`;
`metadcseg_jax.check_settings` runs them with the generic ones before any work.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, TypeVar

import ml_collections

Check = Callable[[Any], str | None]
# (dotted key, check) pairs; a key absent from a config is skipped (older configs, library use).
Rules = tuple[tuple[str, Check], ...]
T = TypeVar("T")


def from_section(cls: type[T], section: Mapping[str, Any], **values: Any) -> T:
  """The dataclass `cls` with each field `section` has read from it by name, `values` on top.

  A field `section` lacks keeps its default (an options object may read a few of its fields
  from elsewhere, given in `values`).
  """
  read = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
  return cls(**{**read, **values})


def integer(low: int | None = None, high: int | None = None) -> Check:
  """An int (not a bool) in [low, high]."""

  def check(v):
    if isinstance(v, bool) or not isinstance(v, int):
      return f"must be an integer, got {v!r}"
    if low is not None and v < low:
      return f"must be >= {low}, got {v}"
    if high is not None and v > high:
      return f"must be <= {high}, got {v}"
    return None

  return check


def number(
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> Check:
  """A finite int or float in [low, high] (an open end with `low_open` / `high_open`).

  Args:
    low, high: the bounds (None: unbounded on that side).
    low_open, high_open: whether the bound itself is excluded.
  """

  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return f"must be a finite number, got {v!r}"
    if low is not None and (v < low or (low_open and v == low)):
      return f"must be {'>' if low_open else '>='} {low}, got {v}"
    if high is not None and (v > high or (high_open and v == high)):
      return f"must be {'<' if high_open else '<='} {high}, got {v}"
    return None

  return check


def one_of(choices) -> Check:
  """One of `choices`."""
  choices = tuple(choices)
  return lambda v: None if v in choices else f"must be one of {choices}, got {v!r}"


def boolean(v) -> str | None:
  """True or False."""
  return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def optional(check: Check) -> Check:
  """None, or what `check` accepts."""
  return lambda v: None if v is None else check(v)


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def problems(config: ml_collections.ConfigDict, rules: Rules) -> list[str]:
  """The sentence of each rule `config` breaks, naming the setting ("config.train.lr must ...")."""
  found = []
  for key, check in rules:
    try:
      value = _get(config, key)
    except KeyError:
      continue
    message = check(value)
    if message:
      found.append(f"config.{key} {message}")
  return found
