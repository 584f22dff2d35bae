"""Default configuration: MetaDCSeg (L2B meta step + DCD) on the synthetic set, U-Net++.

Variant configs import this and override only what differs. Every field can be overridden on the
command line, e.g. `--config.method=ce --config.train.num_epochs=5`.

    metadcseg-train --config=experiments/configs/default.py --workdir=/tmp/metadcseg
"""

import ml_collections
from ml_collections import config_dict

from metadcseg_jax.methods import dale
from metadcseg_jax.methods import gsdnet
from metadcseg_jax import audit
from metadcseg_jax import parallel
from metadcseg_jax.methods import two_network


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # metadcseg_jax.methods.NAMES: plain losses (ce, gce, sce), two networks (coteaching,
  # jocor, gsdnet), meta-weighted (l2b, dale), MetaDCSeg.
  config.method = "metadcseg"

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet++"  # "unet++" | "unet"
  config.model.width = 32
  config.model.deep_supervision = False
  config.model.dtype = "float32"

  config.data = ml_collections.ConfigDict()
  config.data.name = (
    "synthetic"  # synthetic | kvasir_seg | promise12 | msd_brain | msd_heart | folder
  )
  config.data.data_dir = "~/metadcseg_data"  # TFDS builds and noisy-label caches live here
  config.data.manual_dir = ""  # raw data folder for real datasets
  # Reading a folder of your own (name "folder"): channels and num_classes above, and
  # masks binarised as value > mask_threshold (JPEG-compressed masks), mask stem = image stem +
  # mask_suffix (e.g. "_segmentation").
  config.data.mask_threshold = config_dict.placeholder(int)
  config.data.options = ml_collections.ConfigDict()
  config.data.options.mask_suffix = ""
  # Volumes (promise12, msd_*): which training slices to keep ("all", "foreground",
  # "nonzero"); MSD Brain: the modality (name or index in dataset.json, default FLAIR).
  config.data.options.train_slices = config_dict.placeholder(str)
  config.data.options.modality = config_dict.placeholder(str)
  config.data.size = 64
  config.data.channels = 1
  config.data.num_classes = 2
  config.data.n_train = 400  # synthetic only
  config.data.n_val = 50
  config.data.n_test = 100
  config.data.seed = 0  # synthetic generation and the meta split
  # The meta split's own seed (None: data.seed), so that the clean meta set can vary while a
  # synthetic dataset stays the same (the benchmark's `--labels=per_seed`).
  config.data.meta_seed = config_dict.placeholder(int)
  config.data.meta_fraction = 0.02  # MetaDCSeg §4.1: 2% clean meta set
  config.data.augment = True
  config.data.num_workers = 0  # grain worker processes for reading and augmenting (0: threads)
  config.data.noise = ml_collections.ConfigDict()
  # none | l2b20 | l2b40 | l2b60 | markov_sr | markov_se | dist (MetaDCSeg App. A.2)
  config.data.noise.kind = "l2b40"
  config.data.noise.seed = 0
  # L2B kinds only. calibrate: scale the level's kernels so that its measured corruption
  # 1 - Dice of the training masks is its nominal share (20/40/60%, within 3 points; the
  # paper's App. A.2.3). Off: the published kernels, scaled to the image size when
  # scale_kernels_with_size (they suit ~144-320 px images; at 64 px unscaled 40% noise empties
  # a third of the masks).
  config.data.noise.calibrate = True
  config.data.noise.scale_kernels_with_size = True
  config.data.noise.small_mask = "empty"  # masks of 1..300 px: "empty" (L2B) | "keep"

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4
  config.train.meta_batch_size = 2
  config.train.num_epochs = 30
  config.train.warmup_epochs = 3  # plain CE on the noisy labels, no meta step, no DCD
  config.train.optimizer = "sgd"  # sgd | adam (adam only with meta.route="reverse")
  config.train.lr = 0.05
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.grad_clip = 0.2  # global norm; 0 disables
  config.train.ema_decay = 0.99
  # BatchNorm statistics used with the EMA weights at evaluation: "ema" (the EMA of the running
  # statistics) | "recompute" (one train-mode pass over the training images for the EMA
  # weights, SWA's bn_update). results.json holds both; the default is the one ahead on
  # validation Dice (BUILD_NOTES.md, "The EMA weights' BatchNorm statistics").
  config.train.ema_batch_stats = "ema"
  config.train.eval_every_epochs = 5
  config.train.eval_batch_size = 16
  config.train.log_every_steps = 50
  # Gradient norm per loss term, meta-weight and DCD statistics into metrics.jsonl (0: off).
  config.train.diagnostics_every_steps = 50
  config.train.checkpoint_every_epochs = 1
  # Step checkpoints inside an epoch (0: off), so a large epoch is never lost whole; a stop
  # signal writes one too. Resuming from one gives the results of an uninterrupted run.
  config.train.checkpoint_every_steps = 0
  config.train.checkpoint_every_minutes = 30.0
  config.train.keep_checkpoints = 2
  config.train.num_panel_images = 6

  config.meta = ml_collections.ConfigDict()
  config.meta.route = "jvp"  # "jvp" (forward-over-reverse, linear updates) | "reverse"
  config.meta.a0 = 0.0  # (a0, b0) = (0, 0): L2B's code; (1, 0): the paper's Eq. 2
  config.meta.b0 = 0.0
  config.meta.eta = 0.01  # meta lr (Table 8 "Meta LR Scale"); cancels when (a0, b0) = (0, 0)
  config.meta.normalizer = "image"  # "image" (Eq. 24) | "batch" (L2B)
  config.meta.extra_clean_step = False  # L2B code: extra real step on the clean meta batch
  config.meta.use = True  # ablation "meta off": plain CE weights (MetaDCSeg §3.4)
  # Matmul/convolution precision of the meta step: "highest" (true float32; a GPU's default
  # TF32 rounds the per-pixel meta-gradients, BUILD_NOTES.md) | "high" | "default".
  config.meta.precision = "highest"

  config.dcd = ml_collections.ConfigDict()
  config.dcd.use = True
  config.dcd.use_dice = True
  config.dcd.tau = 0.7
  config.dcd.tau_dcd = 1.0
  config.dcd.lambda_bd = 0.35
  config.dcd.lambda_dice = 0.08
  # Edge pixels of Eq. 8: "auto" (PiDiNet if pidinet_weights is set, else Canny) | "pidinet" |
  # "canny" | "sobel" (top edge_top_fraction of the Sobel magnitude).
  config.dcd.edges = "auto"
  config.dcd.pidinet_weights = ""  # the released table5_pidinet.pth (see the README)
  config.dcd.canny_sigma = 2.0
  config.dcd.edge_top_fraction = 0.05
  # How Eq. 12-13 are read (BUILD_NOTES.md "DCD weights"): DCD divided by its boundary mean
  # ("mean") or not ("none"); weights with mean 1 ("mean_one") or sum 1 ("sum_one"); the
  # boundary term on the meta-weighted loss ("meta") or on πa·f + πb·g ("mixing").
  config.dcd.dcd_scale = "mean"
  config.dcd.weight_sum = "mean_one"
  config.dcd.pixel_loss = "meta"
  config.dcd.detach_weights = True  # no gradient through h into w (Eq. 43, Eq. 44)
  config.dcd.center_momentum = 0.9

  # Each method's own settings live in its module, beside the code that reads them.
  config.coteach = two_network.default_config()  # small-loss selection (coteaching, jocor)
  config.gsdnet = gsdnet.default_config()
  config.dale = dale.default_config()

  # Label audit (metadcseg-audit): meta methods score every training mask in their last epochs.
  config.audit = audit.default_config()

  # Data parallel over `mesh.data` devices (-1: all); several hosts join by `distributed`.
  config.mesh = parallel.mesh_config()
  config.distributed = parallel.distributed_config()

  config.loss = ml_collections.ConfigDict()
  config.loss.gce_q = 0.7
  config.loss.sce_alpha = 0.1
  config.loss.sce_beta = 1.0
  return config
