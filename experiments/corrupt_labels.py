"""`metadcseg-corrupt` from a checkout, as `python -m experiments.corrupt_labels`.

The command is `metadcseg_jax.commands.corrupt`; `--help` lists its flags.
"""

from metadcseg_jax.commands import corrupt

if __name__ == "__main__":
  corrupt.run()
