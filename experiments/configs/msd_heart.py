r"""MetaDCSeg on MSD Task02 Heart with the paper's Table 8 hyper-parameters (see table8.py).

    metadcseg-train --config=experiments/configs/msd_heart.py \
        --config.data.manual_dir=/path/to/Task02_Heart --workdir=runs/msd_heart

Input: the Task02_Heart folder (imagesTr/, labelsTr/, dataset.json).
Cost: 160 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from experiments.configs import table8


def get_config():
  return table8.config_for("msd_heart")
