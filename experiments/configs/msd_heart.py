r"""MetaDCSeg on MSD Task02 Heart with the paper's Table 8 hyper-parameters.
The rows of Table 8 are `metadcseg_jax.configs.TABLE8`.

    metadcseg-train --config=experiments/configs/msd_heart.py \
        --config.data.manual_dir=/path/to/Task02_Heart --workdir=runs/msd_heart

Input: the Task02_Heart folder (imagesTr/, labelsTr/, dataset.json).
Cost: 160 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.table8_config("msd_heart")
  config.data.noise.kind = "l2b40"  # the paper's main column (none: the clean one)
  return config
