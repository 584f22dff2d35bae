"""Progress lines of a long loop: how far it is, how fast it goes and the time left.

    lines = progress.Lines(len(files), print, verb="predicted", noun="files")
    for done, path in enumerate(files, 1):
      ...
      lines.update(done)   # at most one line every `every_s` seconds

The trainer's lines (epoch, step, loss, images/s) are its own (`training.train.Progress`); the
time left is written the same way everywhere (`duration`).
"""

import time
from typing import Callable


def duration(seconds: float) -> str:
  """A time span as a person reads it, to the second below a minute, to the minute above an hour.

  >>> duration(42.4), duration(125), duration(3 * 3600 + 61)
  ('42s', '2m05s', '3h01m')
  """
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Lines:
  """One line at most every `every_s` seconds: `{verb} {done}/{total} {noun}, {rate} {noun}/s,
  about {time left} left`, the rate measured since the loop began.

  Args:
    total: how many items the loop does.
    echo: where the lines go.
    verb, noun: the line's words ("scored", "cases").
    every_s: seconds between lines (0: a line per update).
    last: also a line when the last item is done (otherwise the loop's own summary follows).
    clock: seconds, monotonic (tests give their own).
  """

  def __init__(
    self,
    total: int,
    echo: Callable[[str], None],
    *,
    verb: str,
    noun: str,
    every_s: float = 5.0,
    last: bool = False,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total, self.echo, self.verb, self.noun = total, echo, verb, noun
    self.every_s, self.last, self.clock = every_s, last, clock
    self.start = self.previous = clock()
    self.done = 0

  def update(self, done: int) -> None:
    """`done` items of `total` are done."""
    self.done = done
    now = self.clock()
    finished = done >= self.total
    if (finished and not self.last) or (now - self.previous < self.every_s and not finished):
      return
    self.previous = now
    rate = done / max(now - self.start, 1e-9)
    left = duration((self.total - done) / max(rate, 1e-9))
    self.echo(
      f"{self.verb} {done}/{self.total} {self.noun}, {rate:.2f} {self.noun}/s, about {left} left"
    )

  def step(self, n: int = 1) -> None:
    """`n` more items are done."""
    self.update(self.done + n)
