"""MetaDCSeg on Kvasir-SEG, hyper-parameters of the paper's Table 8.

Table 8 row: input 256x256, train batch 2, meta batch 2, 140 epochs (10 warm-up),
lr 0.0060, weight decay 5e-4, meta step 1, meta lr scale 0.01, lambda_bd 0.35,
lambda_dice 0.08, tau_dcd 1.0, boundary ratio 0.14 (undefined in the paper: not used, see
BUILD_NOTES.md), grad threshold 0.08.

    metadcseg-train --config=experiments/configs/kvasir_seg.py \
        --config.data.manual_dir=/path/to/Kvasir-SEG --workdir=/tmp/kvasir_seg

Input: the Kvasir-SEG folder (images/ and masks/ jpg). Cost: a GPU run of hours (140 epochs); on a CPU, days.
Override the label noise with --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "kvasir_seg"
  config.data.noise.scale_kernels_with_size = False  # L2B kernels as published
  config.data.size = 256
  config.data.channels = 3
  config.model.width = 32
  config.train.batch_size = 2
  config.train.meta_batch_size = 2
  config.train.num_epochs = 140
  config.train.warmup_epochs = 10
  config.train.lr = 0.0060
  config.train.weight_decay = 5e-4
  config.train.grad_clip = 0.08
  config.train.eval_every_epochs = 10
  config.meta.eta = 0.01
  config.dcd.lambda_bd = 0.35
  config.dcd.lambda_dice = 0.08
  config.dcd.tau_dcd = 1.0
  return config
