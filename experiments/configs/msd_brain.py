"""MetaDCSeg on MSD Task01 BrainTumour, hyper-parameters of the paper's Table 8.

Table 8 row: input 160x160, train batch 1, meta batch 2, 180 epochs (15 warm-up),
lr 0.0035, weight decay 4e-4, meta step 1, meta lr scale 0.01, lambda_bd 0.28,
lambda_dice 0.14, tau_dcd 1.0, boundary ratio 0.12 (undefined in the paper: not used, see
BUILD_NOTES.md), grad threshold 0.12.

    metadcseg-train --config=experiments/configs/msd_brain.py \
        --config.data.manual_dir=/path/to/Task01_BrainTumour --workdir=/tmp/msd_brain

Input: the Task01_BrainTumour folder (imagesTr/, labelsTr/, dataset.json). Cost: a GPU run of hours (180 epochs); on a CPU, days.
Override the label noise with --config.data.noise.kind=l2b20|l2b40|l2b60|markov_sr|markov_se|dist.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "msd_brain"
  config.data.noise.scale_kernels_with_size = False  # L2B kernels as published
  config.data.size = 160
  config.data.channels = 1
  config.model.width = 32
  config.train.batch_size = 1
  config.train.meta_batch_size = 2
  config.train.num_epochs = 180
  config.train.warmup_epochs = 15
  config.train.lr = 0.0035
  config.train.weight_decay = 4e-4
  config.train.grad_clip = 0.12
  config.train.eval_every_epochs = 10
  config.meta.eta = 0.01
  config.dcd.lambda_bd = 0.28
  config.dcd.lambda_dice = 0.14
  config.dcd.tau_dcd = 1.0
  return config
