"""`metadcseg-benchmark` from a checkout, as `python -m experiments.benchmark`.

The command is `metadcseg_jax.commands.benchmark`; `--help` lists its flags.
"""

from metadcseg_jax.commands import benchmark

if __name__ == "__main__":
  benchmark.run()
