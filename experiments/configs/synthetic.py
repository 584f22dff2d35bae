"""The README demo: MetaDCSeg on the built-in synthetic set with L2B 40% label noise, on a CPU.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=runs/synthetic

64x64 single-channel images, 400 training images (8 of them the clean meta split) whose labels
are corrupted with L2B's 40% level (kernels scaled to the image size), U-Net++ width 8,
evaluation on 100 clean test images. Cost and result: BUILD_NOTES.md, "The quick start".
For the clean-label baseline add `--config.method=ce --config.data.noise.kind=none`.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.default_config()
  config.model.width = 8
  config.data.size = 64
  config.data.n_train = 400
  config.data.n_val = 50
  config.data.n_test = 100
  config.train.batch_size = 4
  config.train.num_epochs = 20
  config.train.warmup_epochs = 3
  config.train.lr = 0.05
  config.train.eval_every_epochs = 5
  config.train.log_every_steps = 25
  return config
