"""`metadcseg-throughput` is now `metadcseg-speed` (`metadcseg-speed --help`); this name runs it,
with the old flags, until the next release.

    metadcseg-throughput --size=64 --width=8 --channels=1 --batches=4   # as before
    # is metadcseg-speed --sizes=64 --widths=8 --channels=1 --batches=4
"""

from metadcseg_jax.commands import speed

# The old flags' new names (the defaults are metadcseg-speed's).
RENAMED = {"size": "sizes", "width": "widths"}


def run():
  """Console-script entry (pyproject `metadcseg-throughput`)."""
  speed.run_renamed("metadcseg-throughput", RENAMED)


if __name__ == "__main__":
  run()
