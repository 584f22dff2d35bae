"""Tiny MetaDCSeg run for tests and smoke checks: 32x32, U-Net++ width 4, 2 epochs (seconds).

    metadcseg-train --config=experiments/configs/tiny.py --workdir=/tmp/metadcseg_tiny

Cost: about 30-60 s on a 2-core CPU, nearly all of it jit compilation.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.default_config()
  config.model.width = 4
  config.data.data_dir = "/tmp/metadcseg_data"
  config.data.size = 32
  config.data.n_train = 24
  config.data.n_val = 4
  config.data.n_test = 8
  config.data.noise.kind = "l2b40"
  config.train.batch_size = 4
  config.train.meta_batch_size = 2
  config.train.num_epochs = 2
  config.train.warmup_epochs = 1
  config.train.eval_every_epochs = 1
  config.train.eval_batch_size = 8
  config.train.log_every_steps = 2
  config.train.diagnostics_every_steps = 3
  config.train.num_panel_images = 2
  return config
