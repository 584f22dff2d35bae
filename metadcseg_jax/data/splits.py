"""A user's own folder split four ways (train, meta, val, test) around the masks they trust.

The clean meta set of L2B and MetaDCSeg, and the masks validation and test are scored against,
must be masks someone verified: on a user's own data the masks in `masks/` (or `labelsTr/`)
are the cheap, noisy ones the method is for. The user names the verified ones either as a
folder `trusted/` beside `masks/` (a mask per verified image, same stem, replacing the one in
`masks/` for that image) or as a text file of stems (case ids) whose masks in `masks/` are
verified (`config.data.trusted_list=FILE`; `all`: every mask). Then

  * meta, val and test are drawn from the trusted cases only (`config.data.trusted_split`
    shares of them; the meta split holds at least one meta batch), and the trusted cases left
    over train with their verified mask: a trusted case never trains on an untrusted mask;
  * every other case trains with the mask the user gave.

Without trusted masks the split is the builder's usual one (80/10/10 by case, seeded by
`config.data.seed`) with the meta split a seeded `config.data.meta_fraction` of the training
cases: clean only where the noise is injected (the benchmark), which the trainer checks.

The split is a JSON file a user can write, as nnU-Net's `splits_final.json`: `{"train":
[...], "meta": [...], "val": [...], "test": [...]}` (stems or case ids). When it exists it is
used as written and checked (a stem that is not in the folder, or one listed twice, is an error
naming it); when absent, the split made here is written there, so a run can be repeated and a
split shared. `config.data.split_file` names it; empty: `<manual_dir>/splits_final.json` when
that exists, else `<workdir>/splits_final.json` (written, never into the user's folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from metadcseg_jax import files
from metadcseg_jax.data import readers
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError

# The lists of a split file, in the order they are written.
LISTS = ("train", "meta", "val", "test")
# The split file a user may leave in their folder, and the name of the one a run writes.
SPLIT_FILE = "splits_final.json"
TRUSTED_DIR = "trusted"
ALL = "all"
# The builder's own proportions of train, val and test (by case) without trusted masks.
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The four-way split of a user's folder and which of its masks are trusted.

  Attributes:
    splits: {"train", "meta", "val", "test": sorted case ids}, disjoint.
    trusted: sorted case ids whose reference mask is verified.
    trusted_source: where the trusted masks come from: "trusted/ folder", "list <file>",
      "all" (every mask), or "" (none).
    file: the split file read or written.
    generated: the split was made here (False: read as the user wrote it).
    how: how the split was made (seed, shares), for data_info.json and results.json.
  """

  splits: dict[str, list[str]]
  trusted: list[str]
  trusted_source: str
  file: str
  generated: bool
  how: dict[str, Any]

  @property
  def has_trusted(self) -> bool:
    return bool(self.trusted)

  @property
  def uses_trusted_folder(self) -> bool:
    return self.trusted_source == f"{TRUSTED_DIR}/ folder"

  def digest(self) -> str:
    """8 hex digits naming what the build's records depend on: the lists and the trusted
    masks' source (a verified mask from trusted/ changes a record's label)."""
    key = {"splits": self.splits, "trusted": self.trusted, "folder": self.uses_trusted_folder}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> dict[str, Any]:
    """What data_info.json and results.json record: counts, sources, the trusted cases."""
    return {
      "split_file": self.file,
      "split_generated": self.generated,
      "counts": {k: len(v) for k, v in self.splits.items()},
      "how": self.how,
      "trusted_source": self.trusted_source or None,
      "n_trusted": len(self.trusted),
      "trusted": list(self.trusted),
    }


def read_trusted_list(path: pathlib.Path, case_ids: Sequence[str]) -> list[str]:
  """The stems listed in `path` (one per line; blank lines and `#` comments ignored).

  Raises:
    DataError: the file cannot be read, lists a stem twice or one not in `case_ids`.
  """
  try:
    lines = pathlib.Path(path).expanduser().read_text().splitlines()
  except OSError as e:
    raise DataError(f"cannot read config.data.trusted_list {path}: {e}") from e
  stems = [line.split("#", 1)[0].strip() for line in lines]
  stems = [s for s in stems if s]
  known = set(case_ids)
  for i, stem in enumerate(stems):
    if stem not in known:
      raise DataError(f"{path} lists {stem!r} (line {i + 1}), which is not a case of the folder")
    if stem in stems[:i]:
      raise DataError(f"{path} lists {stem!r} twice")
  if not stems:
    raise DataError(f"{path} lists no stems: name the cases whose masks are verified")
  return sorted(stems)


def trusted_cases(
  data, case_ids: Sequence[str], folder_ids: Sequence[str] | None
) -> tuple[list[str], str]:
  """The trusted case ids and their source, from `config.data` (`data`).

  Args:
    data: the `config.data` section (`trusted_list`).
    case_ids: every case of the folder.
    folder_ids: the cases with a mask in the folder's `trusted/`, or None when there is no such
      folder.

  Raises:
    ConfigError: both a trusted/ folder and config.data.trusted_list name trusted masks.
    DataError: as `read_trusted_list`.
  """
  listed = str(data.trusted_list or "")
  if listed and folder_ids is not None:
    raise ConfigError(
      f"the folder has {TRUSTED_DIR}/ and config.data.trusted_list={listed!r} is set: name the "
      "trusted masks one way"
    )
  if folder_ids is not None:
    if not folder_ids:  # an empty trusted/ must not pass for a clean source
      raise DataError(
        f"{TRUSTED_DIR}/ holds no mask of a case of the folder (same names as the images, or "
        "as labelsTr/): put verified masks there, or remove it"
      )
    return sorted(folder_ids), f"{TRUSTED_DIR}/ folder"
  if listed == ALL:
    return sorted(case_ids), ALL
  if listed:
    return read_trusted_list(pathlib.Path(listed), case_ids), f"list {listed}"
  return [], ""


def split_file_path(data, workdir: pathlib.Path | None) -> tuple[pathlib.Path | None, bool]:
  """(the split file to read or write, whether it exists). None: nowhere to write one (a run
  opened without a workdir makes its split in memory)."""
  named = str(data.split_file or "")
  if named:
    path = pathlib.Path(named).expanduser()
    return path, path.is_file()
  in_folder = pathlib.Path(data.manual_dir).expanduser() / SPLIT_FILE
  if in_folder.is_file():
    return in_folder, True
  if workdir is None:
    return None, False
  path = pathlib.Path(workdir) / SPLIT_FILE
  return path, path.is_file()


def _counts(n: int, shares: Mapping[str, float], min_meta: int) -> dict[str, int]:
  """Trusted cases per list: meta >= min_meta, val >= 1, test >= 1; train the rest."""
  n_meta = max(min_meta, int(math.ceil(shares["meta"] * n - 1e-9)))
  n_val = max(1, int(math.floor(shares["val"] * n + 0.5)))
  n_test = max(1, int(math.floor(shares["test"] * n + 0.5)))
  over = n_meta + n_val + n_test - n
  # Rounding may ask for one or two more than there are: the test list gives them back first.
  while over > 0 and n_test > 1:
    n_test, over = n_test - 1, over - 1
  while over > 0 and n_val > 1:
    n_val, over = n_val - 1, over - 1
  if over > 0:
    raise DataError(
      f"{n} trusted cases cannot hold a meta split of {n_meta} (one meta batch at least), one "
      f"validation and one test case (config.data.trusted_split {dict(shares)}): verify more "
      "masks or lower config.train.meta_batch_size"
    )
  return {"meta": n_meta, "val": n_val, "test": n_test, "train": n - n_meta - n_val - n_test}


def check_shares(shares: Mapping[str, float]) -> None:
  """Raises ConfigError unless `shares` has meta, val, test in (0, 1] summing to at most 1."""
  if set(shares) != {"meta", "val", "test"}:
    raise ConfigError(f"config.data.trusted_split needs meta, val and test, got {dict(shares)}")
  if any(not 0 < float(v) <= 1 for v in shares.values()) or sum(shares.values()) > 1 + 1e-9:
    raise ConfigError(
      f"config.data.trusted_split: shares in (0, 1] summing to at most 1, got {dict(shares)}"
    )


def meta_indices(n: int, *, fraction: float, min_size: int, seed: int) -> tuple[np.ndarray, ...]:
  """Seeded split of n training items into (train, meta) indices, sorted: the meta split is
  ceil(fraction · n) items, at least `min_size` (MetaDCSeg §4.1: 2%, at least one meta batch).

  Args:
    n: the training items.
    fraction: the meta split's share.
    min_size: its least size (a meta batch).
    seed: the draw's seed.

  Raises:
    ConfigError: the meta split would leave nothing to train on.
  """
  n_meta = max(int(math.ceil(fraction * n)), min_size)
  if n_meta >= n:
    raise ConfigError(
      f"meta split of {n_meta} examples leaves no training examples out of "
      f"{n}; lower config.data.meta_fraction or the meta batch size"
    )
  perm = np.random.default_rng([seed, 0x6D657461]).permutation(n)
  return np.sort(perm[n_meta:]), np.sort(perm[:n_meta])


def make_plan(
  case_ids: Sequence[str],
  *,
  trusted: Sequence[str],
  trusted_source: str,
  shares: Mapping[str, float],
  meta_fraction: float,
  min_meta: int,
  seed: int,
  meta_seed: int,
  file: str,
) -> Plan:
  """A seeded four-way split of `case_ids` (see the module docstring).

  Args:
    case_ids: every case of the folder.
    trusted: the trusted cases (empty: none).
    trusted_source: where they come from (`Plan.trusted_source`).
    shares: {"meta", "val", "test"} shares of the trusted cases.
    meta_fraction: without trusted cases, the meta split's share of the training cases.
    min_meta: the fewest meta cases (one meta batch of 2D images; one volume).
    seed: the seed of the train/val/test split (`config.data.seed`).
    meta_seed: the seed of the meta split (`config.data.meta_seed`, else `seed`).
    file: where the split will be written.

  Raises:
    DataError: too few cases or trusted cases for the lists.
  """
  ids = sorted(case_ids)
  if trusted:
    pool = sorted(trusted)
    counts = _counts(len(pool), shares, min_meta)
    order = np.random.default_rng([seed, 0x74727573]).permutation(len(pool))
    shuffled = [pool[i] for i in order]
    cuts = np.cumsum([counts["test"], counts["val"], counts["meta"]])
    lists = {
      "test": shuffled[: cuts[0]],
      "val": shuffled[cuts[0] : cuts[1]],
      "meta": shuffled[cuts[1] : cuts[2]],
    }
    taken = {c for v in lists.values() for c in v}
    lists["train"] = [c for c in ids if c not in taken]
    if not lists["train"]:
      raise ConfigError(
        f"every case is trusted ({trusted_source}) and config.data.trusted_split "
        f"{dict(shares)} gives them all to meta, validation and test: nothing is left to train "
        "on; lower the shares (e.g. --config.data.trusted_split.test=0.1)"
      )
    how = {"seed": seed, "trusted_split": dict(shares), "min_meta": min_meta}
  else:
    # The builder's split and the meta carve of earlier versions, so that a folder without
    # trusted masks keeps the split it had.
    lists = readers.make_splits(ids, fractions=FRACTIONS, seed=seed)
    train_idx, meta_idx = meta_indices(
      len(lists["train"]), fraction=meta_fraction, min_size=min_meta, seed=meta_seed
    )
    lists["meta"] = [lists["train"][i] for i in meta_idx]
    lists["train"] = [lists["train"][i] for i in train_idx]
    how = {"seed": seed, "meta_seed": meta_seed, "fractions": FRACTIONS}
    how["meta_fraction"] = meta_fraction
  return Plan(
    splits={k: sorted(lists[k]) for k in LISTS},
    trusted=sorted(trusted),
    trusted_source=trusted_source,
    file=file,
    generated=True,
    how=how,
  )


def read_split_file(
  path: pathlib.Path,
  case_ids: Sequence[str],
  *,
  trusted: Sequence[str],
  trusted_source: str,
  min_meta: int,
) -> Plan:
  """The split file at `path`, used as written, after checking it against the folder.

  Args:
    path: the split file (nnU-Net's splits_final.json layout with a meta list).
    case_ids: the folder's case ids.
    trusted: the case ids whose masks are verified (empty: no trusted masks named).
    trusted_source: where the trusted masks were named, for the messages.
    min_meta: the least meta cases (a meta batch).

  Raises:
    DataError: one line naming the problem: not JSON, an unknown list, a list that is not a
      list of strings, a stem not in the folder, a stem in two lists (or twice in one), an empty
      val or test list, a meta list shorter than `min_meta`, or (with trusted masks) a meta,
      val or test case whose mask is not trusted.
  """
  try:
    content = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"split file {path}: cannot read it as JSON: {e}") from e
  if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict):
    content = content[0]  # nnU-Net's splits_final.json is a list of folds: one fold here
  if not isinstance(content, dict):
    raise DataError(f"split file {path}: expected an object with lists {LISTS}")
  unknown = sorted(set(content) - set(LISTS) - {"format", "how", "trusted"})
  if unknown:
    raise DataError(f"split file {path}: unknown list {unknown[0]!r}; the lists are {LISTS}")
  known, trusted_set = set(case_ids), set(trusted)
  where: dict[str, str] = {}
  lists = {}
  for name in LISTS:
    values = content.get(name, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
      raise DataError(f"split file {path}: {name!r} must be a list of stems (strings)")
    for stem in values:
      if stem not in known:
        raise DataError(f"split file {path}: {name!r} lists {stem!r}, which is not in the folder")
      if stem in where:
        raise DataError(
          f"split file {path}: {stem!r} is listed in both {where[stem]!r} and {name!r}"
          if where[stem] != name
          else f"split file {path}: {stem!r} is listed twice in {name!r}"
        )
      where[stem] = name
      if trusted_set and name != "train" and stem not in trusted_set:
        raise DataError(
          f"split file {path}: {name!r} lists {stem!r}, whose mask is not trusted "
          f"({trusted_source}); meta, val and test take trusted masks only"
        )
    lists[name] = sorted(values)
  for name in ("val", "test"):
    if not lists[name]:
      raise DataError(f"split file {path}: the {name!r} list is empty")
  if len(lists["meta"]) < min_meta:
    raise DataError(
      f"split file {path}: the 'meta' list has {len(lists['meta'])} cases, fewer than one meta "
      f"batch ({min_meta})"
    )
  unused = sorted(known - set(where))
  if unused:
    logging.warning(
      "split file %s: %d cases of the folder are in no list and are not used: %s",
      path,
      len(unused),
      ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""),
    )
  return Plan(
    splits=lists,
    trusted=sorted(trusted),
    trusted_source=trusted_source,
    file=str(path),
    generated=False,
    how={"split_file": str(path)},
  )


def write_split_file(plan: Plan) -> None:
  """Writes `plan`'s lists to `plan.file` (atomically: never half a split file)."""
  path = pathlib.Path(plan.file)
  content = {k: plan.splits[k] for k in LISTS}
  content["how"] = plan.how
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, json.dumps(content, indent=1))
  logging.info("wrote split file %s: %s", path, {k: len(v) for k, v in plan.splits.items()})


def plan_for(
  data,
  case_ids: Sequence[str],
  trusted_folder_ids: Sequence[str] | None,
  *,
  min_meta: int,
  workdir: pathlib.Path | None,
) -> Plan:
  """The split of a user's folder: the split file when there is one, else a new seeded split
  (written where `split_file_path` says).

  Args:
    data: the `config.data` section.
    case_ids: every case of the folder.
    trusted_folder_ids: the cases with a mask in `trusted/` (None: no such folder).
    min_meta: the fewest meta cases.
    workdir: the run's folder (where a new split is written by default), or None.
  """
  check_shares(dict(data.trusted_split))
  trusted, source = trusted_cases(data, case_ids, trusted_folder_ids)
  path, exists = split_file_path(data, workdir)
  if data.split_file and not exists:
    # Most likely a typo when the user meant to name their own file: say where the new one goes.
    logging.warning(
      "config.data.split_file=%s does not exist: the split made is written there", path
    )
  if exists:
    plan = read_split_file(
      path, case_ids, trusted=trusted, trusted_source=source, min_meta=min_meta
    )
    logging.info("split file %s read as written", path)
    return plan
  meta_seed = data.meta_seed
  plan = make_plan(
    case_ids,
    trusted=trusted,
    trusted_source=source,
    shares=dict(data.trusted_split),
    meta_fraction=float(data.meta_fraction),
    min_meta=min_meta,
    seed=int(data.seed),
    meta_seed=int(data.seed if meta_seed is None else meta_seed),
    file=str(path) if path is not None else "",
  )
  if path is not None:
    write_split_file(plan)
  return plan
