"""The benchmark's grid: its rows (methods, and MetaDCSeg's ablation variants), the noise levels
in the order of their values, the presets, and each run's folder and config.

A row is a method, or a method with config overrides (an ablation variant); each (noise, row,
seed) trains into `run_dir(workdir, noise, row, seed)` = `<workdir>/<noise>/<row>/seed<k>` with
`run_config`. Two label modes: "per_seed" (the presets' default: seed k also draws the noise
realisation and the clean meta split, so every row of one seed sees the same corrupted masks
and meta set) and "fixed" (seeds vary the initialisation and data order only).
"""

import dataclasses
import pathlib
import re
from typing import Any, Iterable, Sequence

import ml_collections

from metadcseg_jax import methods
from metadcseg_jax.data import noise
from metadcseg_jax.errors import ConfigError


NOISE_ORDER = ("none", *noise.KINDS)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table: a method, with config overrides for an ablation variant.

  Attributes:
    label: the row's name in the tables ("metadcseg", "metadcseg: DCD off").
    method: config.method.
    overrides: ((dotted config key, value), ...) applied on top of the base config.
  """

  label: str
  method: str
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def dirname(self) -> str:
    """The run folder's name: the label with anything but [A-Za-z0-9_.=+-] as '_'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label)


def method_rows(names: Sequence[str]) -> list[Row]:
  return [Row(n, n) for n in names]


# The paper's Table 5 (meta, DCD, Dice), every option of the DCD weights and the objective, and
# a softer temperature (the diagnostics show Eq. 12's weights still peaked at τ_dcd 1): variants
# of MetaDCSeg, each one setting changed from the default.
ABLATIONS = (
  Row("metadcseg", "metadcseg"),
  Row("metadcseg: meta off", "metadcseg", (("meta.use", False),)),
  Row("metadcseg: DCD off", "metadcseg", (("dcd.use", False),)),
  Row("metadcseg: Dice off", "metadcseg", (("dcd.use_dice", False),)),
  Row("metadcseg: DCD scale none", "metadcseg", (("dcd.dcd_scale", "none"),)),
  Row("metadcseg: weights sum to one", "metadcseg", (("dcd.weight_sum", "sum_one"),)),
  Row("metadcseg: mixing pixel loss", "metadcseg", (("dcd.pixel_loss", "mixing"),)),
  Row("metadcseg: gradient into w", "metadcseg", (("dcd.detach_weights", False),)),
  Row("metadcseg: tau_dcd 4", "metadcseg", (("dcd.tau_dcd", 4.0),)),
  Row("metadcseg: Sobel edges", "metadcseg", (("dcd.edges", "sobel"),)),
  Row("metadcseg: (a0,b0)=(1,0)", "metadcseg", (("meta.a0", 1.0),)),
  Row("metadcseg: batch normaliser", "metadcseg", (("meta.normalizer", "batch"),)),
)


LABEL_MODES = ("per_seed", "fixed")


PRESETS = {
  # The acceptance table: baselines and MetaDCSeg at 0/40/60% noise, 3 seeds.
  "main": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("none", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  # The comparisons under noise only (the Kvasir-SEG CPU table).
  "noisy": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  # The paper's Table 2 columns.
  "paper": dict(
    rows=method_rows(("ce", "l2b", "metadcseg")),
    noises=("none", "l2b20", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
  "ablation": dict(rows=list(ABLATIONS), noises=("l2b40",), seeds=(0, 1, 2), labels="per_seed"),
  # Every registered method (plain losses, two networks, GSD-Net, DALE, L2B, MetaDCSeg) at the
  # same noise levels, seeds and budget.
  "comparison": dict(
    rows=method_rows(methods.NAMES),
    noises=("none", "l2b40", "l2b60"),
    seeds=(0, 1, 2),
    labels="per_seed",
  ),
}


def run_dir(workdir, noise_kind: str, row: Row, seed: int) -> pathlib.Path:
  """`<workdir>/<noise>/<row>/seed<k>`: where one combination trains.

  Args:
    workdir: the benchmark's root directory.
    noise_kind: the noise level (config.data.noise.kind).
    row: the table row (`Row`).
    seed: the seed.
  """
  return pathlib.Path(workdir) / noise_kind / row.dirname / f"seed{seed}"


def parse_seeds(seeds: Iterable[Any]) -> list[int]:
  """Seeds as ints; ConfigError naming `--seeds` otherwise."""
  out = []
  for s in seeds:
    try:
      out.append(int(s))
    except (TypeError, ValueError):
      raise ConfigError(f"--seeds: {s!r} is not an integer") from None
  if not out:
    raise ConfigError("--seeds: give at least one seed")
  return out


def check_grid(rows: Sequence[Row], noises: Sequence[str], seeds: Sequence[int]) -> None:
  """Clear errors before the first (possibly hours-long) run rather than in the middle."""
  bad = [r.method for r in rows if r.method not in methods.NAMES]
  if bad or not rows:
    raise ConfigError(f"--methods: unknown {bad or 'empty list'}, choose from {methods.NAMES}")
  bad = [n for n in noises if n not in NOISE_ORDER]
  if bad or not noises:
    raise ConfigError(f"--noise: unknown {bad or 'empty list'}, choose from {NOISE_ORDER}")
  for name, values in (("rows", [r.label for r in rows]), ("noise", noises), ("seeds", seeds)):
    if len(set(values)) != len(values):
      raise ConfigError(f"--{name}: repeated values in {list(values)}")


def run_config(
  config: ml_collections.ConfigDict,
  *,
  row: Row,
  noise_kind: str,
  seed: int,
  labels: str = "fixed",
) -> ml_collections.ConfigDict:
  """A copy of `config` with the row's method and overrides, the noise kind and the seed; with
  `labels="per_seed"` the seed also draws the noise realisation and the meta split.

  Args:
    config: the base config (left unchanged).
    row: the row: its method and config overrides.
    noise_kind: config.data.noise.kind.
    seed: config.seed (and with "per_seed" the noise seed and config.data.meta_seed).
    labels: "per_seed" or "fixed" (`LABEL_MODES`).
  """
  if labels not in LABEL_MODES:
    raise ConfigError(f"--labels: {labels!r}, choose from {LABEL_MODES}")
  cfg = config.copy_and_resolve_references()
  cfg.method = row.method
  cfg.data.noise.kind = noise_kind
  cfg.seed = seed
  if labels == "per_seed":
    cfg.data.noise.seed = seed
    cfg.data.meta_seed = seed
  for key, value in row.overrides:
    *path, field = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    if field not in node:
      raise ConfigError(f"row {row.label!r}: config has no setting {key!r}")
    node[field] = value
  return cfg


def noise_level(kind: str) -> int | None:
  """The nominal noise level in % of a kind: 0 for none, 20/40/60 for the L2B levels; None for
  the kinds without one (the Markov and distance kinds)."""
  if kind == "none":
    return 0
  return int(kind[len("l2b") :]) if kind in noise.l2b.L2B_LEVELS else None


def sort_noises(kinds: Iterable[str]) -> list[str]:
  """Noise kinds (repeats dropped) by value: none, the L2B levels by `noise_level`, then the
  other kinds in `data.noise.KINDS` order (unknown kinds last, in the order given)."""

  def key(kind):
    level = noise_level(kind)
    if level is not None:
      return (0, level)
    return (1, NOISE_ORDER.index(kind) if kind in NOISE_ORDER else len(NOISE_ORDER))

  return sorted(dict.fromkeys(kinds), key=key)


def noise_label(kind: str) -> str:
  """The column header of a noise kind: "0%" for none, "40%" for l2b40, else the kind."""
  if kind == "none":
    return "0%"
  return f"{kind[3:]}%" if kind in noise.l2b.L2B_LEVELS else kind
