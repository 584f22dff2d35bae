"""`metadcseg-audit` from a checkout, as `python -m experiments.audit`.

The command is `metadcseg_jax.commands.audit`; `--help` lists its flags.
"""

from metadcseg_jax.commands import audit

if __name__ == "__main__":
  audit.run()
