"""`metadcseg-bench` (now `metadcseg-speed`: `python -m experiments.speed`) from a checkout, as
`python -m experiments.bench_step`.

The command is `metadcseg_jax.commands.bench`; `--help` lists its flags.
"""

from metadcseg_jax.commands import bench

if __name__ == "__main__":
  bench.run()
