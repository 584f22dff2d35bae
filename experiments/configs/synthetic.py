"""The README demo: MetaDCSeg on the built-in synthetic set with L2B 60% label noise, on a CPU.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=runs/synthetic

64x64 single-channel images, 320 training images (7 of them the clean meta split) whose labels
are corrupted with L2B's 60% level (kernels scaled to the image size, calibrated), U-Net++ width
8, 10 epochs (2 of plain-CE warm-up), evaluation on 100 clean test images: a few minutes on a
2-core CPU, at a noise level where one seed shows the meta step's lead over plain CE (at 40%
this budget does not separate them; the benchmark measures both over seeds). Cost and result:
BUILD_NOTES.md, "The quick start". For plain CE on the same labels add
`--config.method=ce --workdir=runs/ce`.
"""

from metadcseg_jax import configs


def get_config():
  config = configs.default_config()
  config.model.width = 8
  config.data.size = 64
  config.data.n_train = 320
  config.data.n_val = 50
  config.data.n_test = 100
  config.data.noise.kind = "l2b60"
  config.train.batch_size = 4
  config.train.num_epochs = 10
  config.train.warmup_epochs = 2
  config.train.lr = 0.05
  config.train.eval_every_epochs = 5
  config.train.log_every_steps = 25
  # One label-audit pass (after the last epoch) instead of two: the demo is timed as a newcomer
  # waits for it (a pass costs about a quarter of an epoch of meta steps, and its compilation).
  config.audit.epochs = 1
  return config
