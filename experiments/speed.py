"""`metadcseg-speed` from a checkout, as `python -m experiments.speed`.

The command is `metadcseg_jax.commands.speed`; `--help` lists its flags.
"""

from metadcseg_jax.commands import speed

if __name__ == "__main__":
  speed.run()
