r"""MetaDCSeg on Kvasir-SEG with the paper's Table 8 hyper-parameters.
The rows of Table 8 are `metadcseg_jax.configs.TABLE8`.

    metadcseg-train --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/path/to/Kvasir-SEG --workdir=runs/kvasir_seg

Input: the Kvasir-SEG folder (images/ and masks/ jpg).
Cost: 140 epochs, hours on a GPU, days on a CPU. The comparison table in this setting (the
GPU preset; several runs share one GPU as separate processes, one per noise level):

    metadcseg-benchmark --config=experiments/configs/kvasir_seg.py --workdir=runs/kvasir_paper \
        --preset=noisy --config.data.manual_dir=/path/to/Kvasir-SEG

A 2-core CPU runs `kvasir_cpu.py` instead.
Label noise: --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist|none.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.table8_config("kvasir_seg")
  config.data.noise.kind = "l2b40"  # the paper's main column (none: the clean one)
  return config
