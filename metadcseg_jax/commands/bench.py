"""`metadcseg-bench` is now `metadcseg-speed` (`metadcseg-speed --help`); this name runs it, with
the old flags and defaults, until the next release.

    metadcseg-bench --sizes=64 --widths=8 --channels=1 --repeats=3   # as before
    # is metadcseg-speed --sizes=64 --widths=8 --channels=1 --repeats=3 --batches=2 \
    #    --methods=ce,l2b_jvp,l2b_reverse,metadcseg --noflops
"""

from metadcseg_jax.commands import speed

# The old flags' new names, and the old defaults where they differ from metadcseg-speed's.
RENAMED = {"batch": "batches", "steps": "methods"}
DEFAULTS = (
  "--sizes=128",
  "--widths=16,32",
  "--channels=1,3",
  "--batches=2",
  "--repeats=5",
  "--methods=ce,l2b_jvp,l2b_reverse,metadcseg",
  "--noflops",
)


def run():
  """Console-script entry (pyproject `metadcseg-bench`)."""
  speed.run_renamed("metadcseg-bench", RENAMED, DEFAULTS)


if __name__ == "__main__":
  run()
