"""`metadcseg-train` from a checkout, as `python -m experiments.main`.

The command is `metadcseg_jax.commands.train`; `--help` lists its flags.
"""

from metadcseg_jax.commands import train

if __name__ == "__main__":
  train.run()
