r"""MetaDCSeg on PROMISE12 with the paper's Table 8 hyper-parameters.
The rows of Table 8 are `metadcseg_jax.configs.TABLE8`.

    metadcseg-train --config=experiments/configs/promise12.py \
        --config.data.manual_dir=/path/to/PROMISE12 --workdir=runs/promise12

Input: the PROMISE12 folder (CaseXX.mhd and CaseXX_segmentation.mhd).
Cost: 120 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.table8_config("promise12")
  config.data.noise.kind = "l2b40"  # the paper's main column (none: the clean one)
  return config
