r"""MetaDCSeg on PROMISE12 with the paper's Table 8 hyper-parameters (see table8.py).

    metadcseg-train --config=experiments/configs/promise12.py \
        --config.data.manual_dir=/path/to/PROMISE12 --workdir=runs/promise12

Input: the PROMISE12 folder (CaseXX.mhd and CaseXX_segmentation.mhd).
Cost: 120 epochs, hours on a GPU, days on a CPU.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from experiments.configs import table8


def get_config():
  return table8.config_for("promise12")
