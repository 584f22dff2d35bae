"""A run's TensorBoard event files, written beside its `metrics.jsonl`.

    tb = Summaries(workdir)
    tb.write_record({"epoch": 1, "step": 12, "split": "train", "loss": 0.31, "lr": 0.01})
    tb.write_images([workdir / "panel.png"], step=24)
    tb.rebuild(records)             # on resume: the event files hold exactly these records
    read(workdir)                   # what the event files hold (tests, scripts)

    tensorboard --logdir runs/      # every run under runs/, named by its folder

Tags: `train/<key>` (the loss terms, `lr`, `images_per_s`; per epoch), `val/<raw|ema>/<metric>`
(Dice, IoU, HD95, ... of every evaluation; with more than two classes also
`val/<raw|ema>/<metric>/<class name>`), `diagnostics/<key>` and `figures/<name>` (the PNGs
a run writes at its end), each at the record's global training step.

Events are written synchronously with tensorboardX's `EventsWriter` (no TensorFlow, no writer
thread): a record is on disk when the call returns, as a metrics.jsonl line is, so a killed run
loses nothing and there is nothing to close at exit. A resumed run rewrites the event file from
the metrics.jsonl records it keeps, so no step is written twice.
"""

import io
import os
import pathlib
import struct
import time
from typing import Any, Iterable

from absl import logging
from PIL import Image
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.record_writer import masked_crc32c

EVENTS_GLOB = "events.out.tfevents.*"
# Record keys that say where a value belongs rather than being one.
_LABEL_KEYS = ("epoch", "step", "split", "params", "phase")
_COLORSPACE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _scalar(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def tag_values(record: dict[str, Any]) -> dict[str, float]:
  """The scalars of one metrics.jsonl record, by TensorBoard tag.

  A record's "per_class" ({class name: {metric: value}}, `metrics.summarize` with more than two
  classes) gives `<split>/<params>/<metric>/<class name>` beside the headline
  `<split>/<params>/<metric>` (the mean over the foreground classes).
  """
  prefix = "/".join(str(record[k]) for k in ("split", "params") if record.get(k) is not None)
  head = f"{prefix}/" if prefix else ""
  out = {
    f"{head}{key}": float(value)
    for key, value in record.items()
    if key not in _LABEL_KEYS and _scalar(value)
  }
  per_class = record.get("per_class")
  if isinstance(per_class, dict):
    for name, scores in per_class.items():
      for metric, value in scores.items() if isinstance(scores, dict) else ():
        if _scalar(value):
          out[f"{head}{metric}/{name}"] = float(value)
  return out


def command(logdir: str | os.PathLike) -> str:
  """The command that shows the runs under `logdir`."""
  return f"tensorboard --logdir {logdir}"


class Summaries:
  """The event file of the run in `logdir` (opened at the first write)."""

  def __init__(self, logdir: str | os.PathLike):
    self.logdir = pathlib.Path(logdir)
    self._writer: EventsWriter | None = None
    self._failed = False

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if not values or self._failed:
      return
    try:
      if self._writer is None:
        self._writer = EventsWriter(str(self.logdir / "events"))
      event = event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
      self._writer.write_event(event)
      self._writer.flush()
    except OSError as e:
      # TensorBoard is a view of metrics.jsonl: a full disk here must not stop training.
      self._failed = True
      logging.warning("%s: stopped writing TensorBoard events: %s", self.logdir, e)

  def write_record(self, record: dict[str, Any]) -> None:
    """Writes a metrics.jsonl record's scalars at its step (records without one are skipped)."""
    if "step" not in record:
      return
    values = []
    for tag, value in tag_values(record).items():
      values.extend(tbx_summary.scalar(tag, value).value)
    self._write(record["step"], values)

  def write_images(self, paths: Iterable[str | os.PathLike], step: int) -> None:
    """Writes PNG files as images tagged `figures/<file stem>`; missing files are skipped."""
    values = []
    for path in map(pathlib.Path, paths):
      try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
          width, height, mode = image.width, image.height, image.mode
      except OSError:
        continue
      if mode not in _COLORSPACE:
        continue
      values.append(
        summary_pb2.Summary.Value(
          tag=f"figures/{path.stem}",
          image=summary_pb2.Summary.Image(
            height=height,
            width=width,
            colorspace=_COLORSPACE[mode],
            encoded_image_string=data,
          ),
        )
      )
    self._write(step, values)

  def rebuild(self, records: Iterable[dict[str, Any]]) -> None:
    """Replaces the event files in `logdir` by one holding `records` (the kept metrics.jsonl):
    on resume, so the steps after the restored checkpoint are not written twice."""
    self.close()
    for old in self.logdir.glob(EVENTS_GLOB):
      old.unlink(missing_ok=True)
    for record in records:
      self.write_record(record)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _records(data: bytes) -> Iterable[bytes]:
  """The payloads of a TFRecord file; stops at a torn or corrupt record (a killed writer)."""
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    end = pos + 12 + length
    if header_crc != masked_crc32c(header) or end + 4 > len(data):
      return
    payload = data[pos + 12 : end]
    if struct.unpack("<I", data[end : end + 4])[0] != masked_crc32c(payload):
      return
    yield payload
    pos = end + 4


def read(logdir: str | os.PathLike) -> list[dict[str, Any]]:
  """What the event files directly in `logdir` hold, in file order: one dict per value,
  {"step", "tag", "value"} for a scalar, {"step", "tag", "image" (PNG bytes), "height",
  "width"} for an image."""
  out = []
  for path in sorted(pathlib.Path(logdir).glob(EVENTS_GLOB)):
    for payload in _records(path.read_bytes()):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        entry: dict[str, Any] = {"step": event.step, "tag": value.tag}
        if value.HasField("image"):
          entry.update(
            image=value.image.encoded_image_string,
            height=value.image.height,
            width=value.image.width,
          )
        elif value.HasField("simple_value"):
          entry["value"] = value.simple_value
        else:
          continue
        out.append(entry)
  return out


def scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Each scalar tag's (step, value) points, in the order written."""
  series: dict[str, list[tuple[int, float]]] = {}
  for entry in read(logdir):
    if "value" in entry:
      series.setdefault(entry["tag"], []).append((entry["step"], entry["value"]))
  return series
