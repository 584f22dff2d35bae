"""`metadcseg-throughput` (now `metadcseg-speed`: `python -m experiments.speed`) from a checkout, as
`python -m experiments.bench_throughput`.

The command is `metadcseg_jax.commands.throughput`; `--help` lists its flags.
"""

from metadcseg_jax.commands import throughput

if __name__ == "__main__":
  throughput.run()
