r"""MetaDCSeg on MSD Task01 BrainTumour (whole tumour, FLAIR), the paper's Table 8 settings.

    metadcseg-train --config=experiments/configs/msd_brain.py \
        --config.data.manual_dir=/path/to/Task01_BrainTumour --workdir=runs/msd_brain

Input: the Task01_BrainTumour folder (imagesTr/, labelsTr/, dataset.json).
Cost: 180 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from experiments.configs import table8


def get_config():
  return table8.config_for("msd_brain")
