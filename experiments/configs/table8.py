"""The paper's Table 8 (MetaDCSeg, per-dataset hyper-parameters) as config overrides.

"Boundary Ratio" is undefined in the paper: recorded here, not used (BUILD_NOTES.md).
"""

import ml_collections

from experiments.configs import default

# name: (input size, channels, train batch, meta batch, epochs, warm-up, lr, weight decay,
#        lambda_bd, lambda_dice, grad threshold, boundary ratio)
TABLE8 = {
  "kvasir_seg": (256, 3, 2, 2, 140, 10, 0.0060, 5e-4, 0.35, 0.08, 0.08, 0.14),
  "promise12": (144, 1, 1, 2, 120, 10, 0.0050, 5e-4, 0.30, 0.10, 0.10, 0.10),
  "msd_heart": (160, 1, 1, 2, 160, 15, 0.0040, 5e-4, 0.33, 0.12, 0.10, 0.11),
  "msd_brain": (160, 1, 1, 2, 180, 15, 0.0035, 4e-4, 0.28, 0.14, 0.12, 0.12),
}


def config_for(name: str) -> ml_collections.ConfigDict:
  """The default config with dataset `name`'s Table 8 row (meta step 1, meta lr scale 0.01,
  tau_dcd 1.0 for every dataset)."""
  (size, channels, batch, meta_batch, epochs, warmup, lr, wd, lambda_bd, lambda_dice, clip, _) = (
    TABLE8[name]
  )
  config = default.get_config()
  config.data.name = name
  config.data.size = size
  config.data.channels = channels
  config.data.noise.scale_kernels_with_size = False  # L2B kernels as published
  config.model.width = 32
  config.train.batch_size = batch
  config.train.meta_batch_size = meta_batch
  config.train.num_epochs = epochs
  config.train.warmup_epochs = warmup
  config.train.lr = lr
  config.train.weight_decay = wd
  config.train.grad_clip = clip
  config.train.eval_every_epochs = 10
  config.meta.eta = 0.01
  config.dcd.lambda_bd = lambda_bd
  config.dcd.lambda_dice = lambda_dice
  config.dcd.tau_dcd = 1.0
  return config
