r"""MetaDCSeg on MSD Task01 BrainTumour (whole tumour, FLAIR), the paper's Table 8 settings.
The rows of Table 8 are `metadcseg_jax.configs.TABLE8`.

    metadcseg-train --config=experiments/configs/msd_brain.py \
        --config.data.manual_dir=/path/to/Task01_BrainTumour --workdir=runs/msd_brain

Input: the Task01_BrainTumour folder (imagesTr/, labelsTr/, dataset.json).
Cost: 180 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.table8_config("msd_brain")
  config.data.noise.kind = "l2b40"  # the paper's main column (none: the clean one)
  return config
