r"""The benchmark's preset setting: the synthetic set at 64 px, sized so that the main table
(ce, l2b, metadcseg at 0/40/60% noise, 3 seeds: 27 runs) fits in 90 minutes on a 2-core CPU
(measured: 70 minutes with single-threaded XLA, 10 epochs of 313 training images).

    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/bench \
        --preset=main
    metadcseg-benchmark --config=experiments/configs/benchmark.py --workdir=runs/ablation \
        --preset=ablation

Label noise: the L2B levels calibrated to their nominal corruption on these masks; the presets
draw each seed's own noise realisation and meta split (`--labels=per_seed`). 500 test images,
so that the paired intervals' test-set part is small next to their seed part. Cost and
results: BUILD_NOTES.md, "The benchmark on the synthetic preset". On a GPU, the synthetic
default size: `--config=experiments/configs/synthetic.py`.
"""

import pathlib

from metadcseg_jax import configs


def get_config():
  config = configs.from_file(pathlib.Path(__file__).with_name("synthetic.py"))
  config.data.n_train = 320
  config.data.n_test = 500
  config.data.noise.kind = "l2b40"  # the presets set each run's level; this is the default's
  config.train.num_epochs = 10
  config.train.warmup_epochs = 2
  config.train.eval_every_epochs = 5
  config.train.log_every_steps = 0
  config.train.diagnostics_every_steps = 98
  config.train.num_panel_images = 4
  config.audit.epochs = 2  # the audit score is chosen over these runs' passes (the demo keeps 1)
  return config
