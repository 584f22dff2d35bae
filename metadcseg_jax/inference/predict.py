"""`metadcseg-predict`'s work: masks for files, folders and globs of images and volumes.

    model = load_model("runs/mine")
    result = predict_paths(model, ["scans/", "extra/*.png"], "pred/", probabilities=True)

Each input goes through the run's preprocessing (`metadcseg_jax.data.preprocess`), the network
(jitted, fixed-size batches over every local device; 2D images from several files share a
batch) and back to its own size and geometry (`metadcseg_jax.inference.io`). A file that cannot
be read is one line naming it and the reason and the others go on; outputs that exist already
are refused before any work unless `overwrite`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import itertools
import pathlib
from typing import Callable, Iterable, Sequence

import numpy as np

from metadcseg_jax import files
from metadcseg_jax import progress
from metadcseg_jax.errors import ConfigError
from metadcseg_jax.errors import DataError
from metadcseg_jax.inference import io
from metadcseg_jax.inference import model as model_lib

# Seconds between progress lines.
PROGRESS_EVERY_S = 5.0


@dataclasses.dataclass
class Job:
  """One output: its input file(s) (several: one per channel) and where its mask goes."""

  inputs: list[pathlib.Path]
  mask: pathlib.Path
  probabilities: pathlib.Path | None


@dataclasses.dataclass
class Result:
  """What a prediction run did: the masks written and the inputs that failed, with why."""

  written: list[pathlib.Path] = dataclasses.field(default_factory=list)
  failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def expand(inputs: Sequence[str]) -> tuple[list[pathlib.Path], list[tuple[str, str]]]:
  """Files, folders (their readable files, not recursive) and globs -> (sorted files, unusable
  inputs with the reason). A folder's other files (hidden, other suffixes, .raw beside .mhd)
  are passed over without a word."""
  found: dict[pathlib.Path, None] = {}
  bad = []
  for text in inputs:
    path = pathlib.Path(text).expanduser()
    if any(ch in text for ch in "*?["):
      matches = sorted(pathlib.Path(p) for p in glob.glob(str(path)))
      usable = [p for p in matches if p.is_file() and io.suffix_of(p)]
      if not usable:
        bad.append((text, "matches no image or volume file"))
      found.update(dict.fromkeys(usable))
    elif path.is_dir():
      usable = [
        p
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".") and io.suffix_of(p)
      ]
      if not usable:
        bad.append((text, f"holds no image or volume file ({', '.join(io.SUFFIXES)})"))
      found.update(dict.fromkeys(usable))
    elif path.is_file():
      if io.suffix_of(path) is None:
        bad.append((text, f"not an image or volume file ({', '.join(io.SUFFIXES)})"))
      else:
        found[path] = None
    else:
      bad.append((text, "no such file or folder"))
  return list(found), bad


def _output_suffix(path: pathlib.Path) -> str:
  suffix = io.suffix_of(path)
  if suffix in io.IMAGE_SUFFIXES:
    return ".png"
  if suffix in io.ITK_SUFFIXES:
    return ".mha"
  return suffix


def plan_jobs(
  model: model_lib.Model, paths: Sequence[pathlib.Path], out_dir: pathlib.Path, *, probabilities
) -> list[Job]:
  """One job per input, or per case of per-channel files (nnU-Net's `<case>_<XXXX>`).

  Args:
    model: the model (its preprocessing decides how inputs are grouped).
    paths: the input files.
    out_dir: the output folder.
    probabilities: also write the class probabilities.

  Raises:
    ConfigError: two inputs would write the same output (a.png and a.jpg), or an output would
      be an input (the output folder is an input folder): a user's files are never replaced.
  """
  pre = model.preprocessing
  inputs = {p.resolve() for p in paths}
  groups: dict[str, list[pathlib.Path]] = {}
  for path in paths:
    volume = io.suffix_of(path) not in io.IMAGE_SUFFIXES
    name = io.case_of(path) if volume and pre.channel_files else io.stem_of(path)
    groups.setdefault(f"{name}\0{_output_suffix(path)}", []).append(path)
  jobs, seen = [], {}
  for key, group in groups.items():
    name, suffix = key.split("\0")
    mask, probs = io.output_paths(name, suffix, out_dir, probabilities)
    if mask in seen or (len(group) > 1 and not pre.channel_files):
      first = seen.get(mask, [group[0]])[0]
      raise ConfigError(
        f"{first} and {group[-1]} would both write {mask}: rename one or predict them separately"
      )
    seen[mask] = group
    clash = [p for p in (mask, probs) if p is not None and p.resolve() in inputs]
    if clash:
      raise ConfigError(
        f"{clash[0]} is an input and would be overwritten by its mask: choose another --output"
      )
    jobs.append(Job(sorted(group), mask, probs))
  return jobs


def check_outputs(jobs: Iterable[Job], *, overwrite: bool) -> None:
  """Raises ConfigError naming the outputs that exist, unless `overwrite`."""
  if overwrite:
    return
  existing = [p for j in jobs for p in (j.mask, j.probabilities) if p is not None and p.exists()]
  if existing:
    names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
    raise ConfigError(
      f"{len(existing)} outputs exist in {existing[0].parent} ({names}): pass --overwrite to "
      "replace them, or another --output"
    )


def _read(job: Job, pre) -> io.Item:
  return io.read_input(job.inputs if len(job.inputs) > 1 else job.inputs[0], pre)


def predict_paths(
  model: model_lib.Model,
  inputs: Sequence[str],
  output: str | pathlib.Path,
  *,
  probabilities: bool = False,
  variant: str | None = None,
  overwrite: bool = False,
  echo: Callable[[str], None] = print,
) -> Result:
  """Predicts every input into `output` (created).

  Args:
    model: `load_model(...)`.
    inputs: files, folders and globs.
    output: the folder the masks go to.
    probabilities: also write the class probabilities.
    variant: "raw" or "ema" (None: the model's default, the weights results.json reports).
    overwrite: replace outputs that exist.
    echo: where progress and failure lines go.

  Returns:
    The masks written and the failures ((input, reason), each also echoed as one line).

  Raises:
    ConfigError: before any work: no usable input at all, two inputs with one output, or
      outputs that exist without `overwrite`.
  """
  out_dir = pathlib.Path(output).expanduser()
  given = [pathlib.Path(t).expanduser() for t in inputs]
  if any(g.is_dir() and g.resolve() == out_dir.resolve() for g in given):
    # The masks would land among the images (and a later run would read them as inputs).
    raise ConfigError(f"--output={output} is an input folder: choose another folder")
  paths, bad = expand(inputs)
  result = Result(failures=list(bad))
  for text, why in bad:
    echo(f"error: {text}: {why}")
  if not paths:
    raise ConfigError("no input to predict: " + "; ".join(f"{t}: {w}" for t, w in bad))
  jobs = plan_jobs(model, paths, out_dir, probabilities=probabilities)
  check_outputs(jobs, overwrite=overwrite)
  out_dir.mkdir(parents=True, exist_ok=True)
  lines = progress.Lines(
    len(jobs), echo, verb="predicted", noun="files", every_s=PROGRESS_EVERY_S, last=True
  )
  pre = model.preprocessing
  ahead = 2 * model.batch_size  # files read ahead: bounded, a folder may hold thousands
  # Files are read (decoded, resized, normalised) in threads while the device predicts.
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    queue = collections.deque()
    todo = iter(jobs)
    pending: list[tuple[Job, io.Item]] = []
    while True:
      for job in itertools.islice(todo, ahead - len(queue)):
        queue.append((job, pool.submit(_read, job, pre)))
      if not queue:
        break
      job, future = queue.popleft()
      try:
        pending.append((job, future.result()))
      except (DataError, OSError, ImportError) as e:
        result.failures.append((str(job.inputs[0]), str(e)))
        echo(f"error: {job.inputs[0]}: {e}")
        lines.step()
        continue
      # 2D images share a batch until it is full; a volume's slices fill batches by themselves.
      volume = len(pending[-1][1].x) > 1
      if volume or sum(len(item.x) for _, item in pending) >= model.batch_size:
        _flush(model, pending, result, variant=variant, echo=echo)
        lines.step(len(pending))
        pending = []
    if pending:
      _flush(model, pending, result, variant=variant, echo=echo)
      lines.step(len(pending))
  return result


def _flush(model, pending, result: Result, *, variant, echo) -> None:
  """Predicts the read items together and writes their outputs."""
  x = np.concatenate([item.x for _, item in pending])
  probs = model.probabilities(x, variant=variant)
  start = 0
  for job, item in pending:
    mine = probs[start : start + len(item.x)]
    start += len(item.x)
    try:
      restored = item.to_file_layout(model.preprocessing.restore(mine, item.shape))
      mask = np.argmax(restored, axis=-1)
      io.write_mask(item, mask, job.mask, model.preprocessing.num_classes)
      if job.probabilities is not None:
        io.write_probabilities(item, restored, job.probabilities)
    except OSError as e:
      if files.is_disk_full(e):  # every later file would fail the same way
        raise files.disk_full_error(job.mask) from e
      result.failures.append((item.source, f"cannot write {job.mask}: {e}"))
      echo(f"error: {item.source}: cannot write {job.mask}: {e}")
      continue
    result.written.append(job.mask)
