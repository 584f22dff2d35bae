"""The method interface: all the trainer, evaluation, checkpoints and figures know of a method.

A method turns a config into a training state and a pure, jittable train step, and predicts
class probabilities from a state. The trainer never looks inside the state (a checkpoint saves
it as an opaque pytree) and never branches on the method's name.

    class MyMethod(base.SingleNetworkMethod):   # or base.Method for several networks
      name = "mine"

      def train_step(self, phase):
        def step(state, batch, rng):            # (state, batch, rng) -> (state, metrics)
          ...
        return step

and one line in `metadcseg_jax/methods/__init__.py`'s `REGISTRY`. A method with settings of its
own names their config section's defaults and rules in the same file:

      config_sections = {"mine": default_config}     # config.mine = default_config()
      config_rules = (("mine.rate", settings.number(0.0, 1.0)),)

(the default config holds the sections of every registered method, and every run checks their
rules before any work).

Batch keys a step receives: "image" (B,H,W,C) float32 and "noisy_label" (B,H,W) int32 (the
labels to learn from; the clean "label" is never given to a step); with `uses_meta_batch`,
also the clean "meta_image" (Bv,H,W,C) and "meta_label" (Bv,H,W).
"""

import abc
import functools
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from metadcseg_jax import settings
from metadcseg_jax.core import models
from metadcseg_jax.core import optim
from metadcseg_jax.core.models import unet
from metadcseg_jax.types import Array

# (state, batch, rng) -> (state, metrics): what `Method.train_step` returns (not yet jitted).
StepFn = Callable[[Any, dict[str, Array], Array], tuple[Any, dict[str, Array]]]
# Parameter sets a prediction can use: the raw parameters and their exponential moving average.
VARIANTS = ("raw", "ema")
# XLA options for functions that run once or twice (figures): 2-3x faster to compile on a CPU,
# slower to run.
RUN_ONCE_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class PixelMap(NamedTuple):
  """One per-pixel map of a batch for a method's figure.

  Attributes:
    title: the column title (name the equation).
    values: (B,H,W) floats; NaN pixels are left undrawn.
    log: draw on a logarithmic colour scale.
  """

  title: str
  values: Array
  log: bool = False


class Method(abc.ABC):
  """A training method: state, train step(s), prediction.

  Attributes:
    name: the registry name (`config.method`).
    uses_meta_batch: the step reads "meta_image"/"meta_label" (a clean batch of the meta
      split), drawn by the trainer from its own stream.
    figure_name: file name of the figure `explain` feeds, or None.
    example_transform: what the input pipeline adds to each example (or None).
    config: the full config.
    steps_per_epoch: optimizer steps per epoch (for schedules).
  """

  name: ClassVar[str] = ""
  uses_meta_batch: ClassVar[bool] = False
  # `audit_maps` gives per-pixel label suspicion (metadcseg_jax/training/audit_passes.py).
  audits: ClassVar[bool] = False
  figure_name: ClassVar[str | None] = None
  # Host-side per-example transform run in the input pipeline after augmentation (e.g. Canny
  # edges for DCD): (example dict of numpy arrays) -> example dict. None: nothing to add.
  example_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  # The config sections of this method's own settings, {section: () -> its defaults}, and the
  # (dotted key, check) rules of their values (`metadcseg_jax.settings`).
  config_sections: ClassVar[Mapping[str, Callable[[], ml_collections.ConfigDict]]] = {}
  config_rules: ClassVar[settings.Rules] = ()

  def __init__(self, config: ml_collections.ConfigDict, *, steps_per_epoch: int):
    self.config = config
    self.steps_per_epoch = steps_per_epoch

  @classmethod
  def default_settings(cls) -> dict[str, ml_collections.ConfigDict]:
    """The config sections of this method's own settings, {section name: defaults}.

    `metadcseg_jax.configs.default_config` holds the sections of every registered method, so
    that a config file may switch methods on the command line.
    """
    return {name: defaults() for name, defaults in cls.config_sections.items()}

  @classmethod
  def check_settings(cls, config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with this method's own settings in `config`, one sentence each naming the
    setting; empty when all is fine. `config_rules`; a method adds checks of combinations.

    `metadcseg_jax.check_settings` runs this for every registered method before any work (no
    dataset, no compilation), so it reads the config only.
    """
    return settings.problems(config, cls.config_rules)

  @classmethod
  def settings_from_data(
    cls, config: ml_collections.ConfigDict, data_info: dict[str, Any]
  ) -> dict[str, Any]:
    """Settings the method takes from the prepared data, as {dotted config key: value}.

    The trainer applies them to the config before building the method (and records them in
    results.json). `data_info` is `pipeline.DataSplits.info` (its "noise" entry has the
    measured corruption). None by default.
    """
    del config, data_info
    return {}

  @abc.abstractmethod
  def init_state(self, rng: Array) -> Any:
    """The initial training state: a pytree with an int32 scalar `step` field."""

  def phase(self, epoch: int) -> str:
    """Which train step epoch `epoch` (0-based) uses; each phase is compiled once, lazily."""
    del epoch
    return "train"

  @abc.abstractmethod
  def train_step(self, phase: str) -> StepFn:
    """The pure step `(state, batch, rng) -> (state, metrics)` of `phase` (scalar metrics)."""

  @abc.abstractmethod
  def predict(self, state: Any, images: Array, *, variant: str = "raw") -> Array:
    """Class probabilities (B,H,W,L) of images (B,H,W,C) with the `variant` parameters."""

  def diagnostics(self, state: Any, batch: dict[str, Array]) -> dict[str, Array]:
    """Scalar diagnostics of one batch at `state`, nothing trained (jittable; the trainer logs
    them every `config.train.diagnostics_every_steps`). None by default."""
    del state, batch
    return {}

  def learning_rate(self, step: int) -> float | None:
    """The learning rate at train step `step`, for the log (None if the method has none)."""
    del step
    return None

  def audit_maps(self, state: Any, batch: dict[str, Array]) -> dict[str, Array]:
    """With `audits`: {"suspicion" (B,H,W) in [0, 1], "pseudo" (B,H,W) int32, the model's
    labels, "probs" (B,H,W,L) the probabilities they are the argmax of} of one batch (as a step
    sees it) at `state`, nothing trained (jittable)."""
    raise NotImplementedError(f"{self.name} computes no label audit")

  # Whether `audit_maps` factors into a part of the meta batch alone (`audit_direction`), shared
  # by every training batch of a pass, and the rest (`audit_maps_along`).
  audit_shares_direction: ClassVar[bool] = False

  def audit_direction(self, state: Any, meta_image: Array, meta_label: Array) -> Any:
    """With `audit_shares_direction`: what `audit_maps` computes from the meta batch
    (Bv,H,W,C), (Bv,H,W) alone at `state` (jittable)."""
    raise NotImplementedError(f"{self.name}'s label audit does not factor")

  def audit_maps_along(self, state: Any, batch: dict[str, Array], direction: Any) -> dict:
    """`audit_maps(state, batch)` of a batch without its meta batch, from that meta batch's
    `audit_direction` (jittable)."""
    raise NotImplementedError(f"{self.name}'s label audit does not factor")

  def recompute_ema_batch_stats(self, state: Any, batches: Callable[[], Iterable[Array]]) -> Any:
    """`state` with the BatchNorm statistics of its EMA weights recomputed from `batches()`
    (equal-sized (B,H,W,C) batches of training images), SWA's `bn_update`. Unchanged by default
    (a method without BatchNorm or EMA)."""
    del batches
    return state

  def explain(self, state: Any, batch: dict[str, Array]) -> list[PixelMap]:
    """Per-pixel maps of one training batch for the figure `figure_name` (none by default).

    `batch` holds "image", "noisy_label" and, with `uses_meta_batch`, a meta batch.
    """
    del state, batch
    return []


@flax.struct.dataclass
class TrainState:
  """The state of a one-network method; a checkpoint holds exactly this.

  Attributes:
    step: optimizer steps taken, int32 scalar.
    params: the network's parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: the optimizer state (momentum buffer, step count).
    ema_params: exponential moving average of `params`.
    ema_batch_stats: exponential moving average of `batch_stats`, used with `ema_params`
      (MetaDCSeg §4.1's EMA model evaluated with its own statistics).
    rng: the loop's key (the per-step key is `fold_in(rng, step)`).
    extra: method-specific state (e.g. the DCD fallback centers), a dict pytree.
  """

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  rng: Array
  extra: Any


def map_norm_stats(fn: Callable[[Array, Array], tuple[Array, Array]], stats: Mapping) -> dict:
  """`fn(mean, var) -> (mean, var)` applied to each BatchNorm's {"mean", "var"} in `stats`."""
  if set(stats) == {"mean", "var"}:
    mean, var = fn(stats["mean"], stats["var"])
    return {"mean": mean, "var": var}
  return {k: map_norm_stats(fn, v) for k, v in stats.items()}


@functools.lru_cache(maxsize=16)
def _jitted_init(model):
  return jax.jit(functools.partial(model.init, train=False))


class SingleNetworkMethod(Method):
  """One U-Net / U-Net++ trained by SGD (or Adam) with an EMA copy: the shared machinery."""

  def __init__(self, config, *, steps_per_epoch):
    super().__init__(config, steps_per_epoch=steps_per_epoch)
    self.model = self.build_network(jnp.dtype(config.model.dtype))
    self.schedule, self.optimizer = self.make_optimizer()

  def build_network(self, dtype) -> Any:
    """`config.model`'s network computing in `dtype` (parameters float32 either way)."""
    m = self.config.model
    return models.build_model(
      m.name,
      num_classes=self.config.data.num_classes,
      width=m.width,
      deep_supervision=m.deep_supervision,
      dtype=dtype,
    )

  def make_optimizer(self) -> tuple[optax.Schedule, optim.Optimizer]:
    """`(learning-rate schedule, optimizer)` from `config.train` (a method with its paper's own
    optimizer overrides this)."""
    t = self.config.train
    # The schedule counts optimizer updates: per epoch, steps times updates per step.
    schedule = optim.lr_schedule(t.lr, self.steps_per_epoch * self.updates_per_step())
    optimizer = optim.make_optimizer(
      name=t.optimizer,
      learning_rate=schedule,
      momentum=t.momentum,
      weight_decay=t.weight_decay,
      grad_clip=t.grad_clip or None,
    )
    return schedule, optimizer

  def updates_per_step(self) -> int:
    """Optimizer updates one train step makes (the learning rate is set per epoch)."""
    return 1

  def learning_rate(self, step):
    return float(self.schedule(step * self.updates_per_step()))

  def init_extra(self) -> dict[str, Array]:
    """Method-specific state (`TrainState.extra`)."""
    return {}

  def init_state(self, rng):
    rng_init, rng_loop = jax.random.split(rng)
    size, channels = self.config.data.size, self.config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    # The partitionable threefry (jax's default) made XLA take ~40 s to compile the ~60
    # parameter draws of a U-Net++ on a 2-core CPU; the classic one takes ~5 s and is as
    # deterministic.
    with jax.threefry_partitionable(False):
      variables = _jitted_init(self.model)(rng_init, x)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=self.optimizer.tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      rng=rng_loop,
      extra=self.init_extra(),
    )
    # Committed like a restored checkpoint, so a resumed run hits the same compiled steps.
    return jax.device_put(state, jax.local_devices()[0])

  def forward(self, params, batch_stats, x: Array) -> tuple[tuple[Array, Array], Any]:
    """Train-mode forward of x (B,H,W,C): `((logits (B,H,W,L), features (B,H,W,D)), stats)`."""
    outputs, updates = self.model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return outputs, updates["batch_stats"]

  def update_params(self, params, opt_state, grads) -> tuple[Any, Any]:
    """One real optimizer update (clipping included): `(params, opt_state)`."""
    updates, opt_state = self.optimizer.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def finish_step(
    self,
    state: TrainState,
    params,
    opt_state,
    batch_stats,
    *,
    extra: dict[str, Array] | None = None,
  ) -> TrainState:
    """The state after a step: new parameters and statistics, their EMA, the step count.

    Args:
      state: the state before the step.
      params, opt_state: the updated parameters and optimizer state.
      batch_stats: the BatchNorm statistics the step's forward updated.
      extra: the method's own state entries to replace, or None.
    """
    rate = 1.0 - self.config.train.ema_decay
    return state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=optax.incremental_update(params, state.ema_params, rate),
      ema_batch_stats=optax.incremental_update(batch_stats, state.ema_batch_stats, rate),
      extra=state.extra if extra is None else extra,
    )

  def apply_gradients(
    self, state: TrainState, grads, batch_stats, *, extra: dict[str, Array] | None = None
  ) -> TrainState:
    """`update_params` then `finish_step`.

    Args:
      state: the state before the step.
      grads: the gradient of the loss in the parameters.
      batch_stats: the BatchNorm statistics the step's forward updated.
      extra: the method's own state entries to replace, or None.
    """
    params, opt_state = self.update_params(state.params, state.opt_state, grads)
    return self.finish_step(state, params, opt_state, batch_stats, extra=extra)

  @staticmethod
  def measurements(loss: Array, grads, params) -> dict[str, Array]:
    """The metrics every step reports: loss, gradient and parameter norms."""
    return {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
    }

  def plain_step(self, pixel_loss: Callable[[Array, Array], Array]) -> StepFn:
    """A step on `mean(pixel_loss(logits (B,H,W,L), labels (B,H,W)))` of the noisy labels."""

    def step(state: TrainState, batch, rng):
      del rng  # no stochastic layers; the signature is shared with methods that need one

      def loss_fn(params):
        (logits, _), stats = self.forward(params, state.batch_stats, batch["image"])
        return jnp.mean(pixel_loss(logits, batch["noisy_label"])), stats

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      new_state = self.apply_gradients(state, grads, stats)
      return new_state, self.measurements(loss, grads, new_state.params)

    return step

  @functools.cached_property
  def _batch_moments(self) -> Callable:
    def moments(params, batch_stats, images):
      zeros = jax.tree.map(jnp.zeros_like, batch_stats)
      _, updates = self.model.apply(
        {"params": params, "batch_stats": zeros}, images, train=True, mutable=["batch_stats"]
      )
      # flax's running update is m·old + (1 − m)·batch: from zeros it is (1 − m)·batch.
      scale = 1.0 / (1.0 - unet.BN_MOMENTUM)
      return map_norm_stats(
        lambda mean, var: (mean * scale, var * scale + jnp.square(mean * scale)),
        updates["batch_stats"],
      )

    return jax.jit(moments)

  def recomputed_batch_stats(self, params, batch_stats, batches: Iterable[Array]):
    """BatchNorm statistics of `params` over all of `batches` (equal-sized (B,H,W,C) arrays).

    Each BatchNorm's mean and (biased) variance over every pixel of every batch, each layer's
    input normalised with its batch's statistics as in training: the mean of the batch means
    and of the batch second moments, variance = second moment − mean².
    """
    total, n = None, 0
    for images in batches:
      m = self._batch_moments(params, batch_stats, images)
      total = m if total is None else jax.tree.map(jnp.add, total, m)
      n += 1
    if n == 0:
      raise ValueError("recomputing BatchNorm statistics needs at least one batch")
    return map_norm_stats(
      lambda mean, sq: (mean / n, jnp.maximum(sq / n - jnp.square(mean / n), 0.0)), total
    )

  def recompute_ema_batch_stats(self, state, batches):
    return state.replace(
      ema_batch_stats=self.recomputed_batch_stats(
        state.ema_params, state.ema_batch_stats, batches()
      )
    )

  def predict(self, state, images, *, variant="raw"):
    if variant == "ema":
      variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = self.model.apply(variables, images, train=False)
    return jax.nn.softmax(logits, axis=-1)
