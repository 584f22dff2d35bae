"""L2B's meta step as its official code builds it, in PyTorch, against this project's in float64.

The PyTorch side (`bench` extra) is the reference method's framework: the NestedUNet of
metadcseg_jax/tools/torch_ref.py loaded with the very U-Net++ weights of the Flax model, a
functional forward, the virtual SGD step (momentum buffer, weight decay) built with
`torch.autograd.grad(..., create_graph=True)`, the gradient of the clean meta loss with respect
to the per-pixel weights (MetaDCSeg Eq. 21-22), rectified and normalised per image (Eq. 23-24),
then the real step by `torch.optim.SGD`. â and b̂ must equal the project's to 1e-12 at step 0
and again after one real step of each (with a momentum buffer then), and so must the weights.

The virtual loss is averaged over the B·H·W pixels and η = 0.01 multiplies the meta-gradients,
as the project's meta step defines them: at (a0, b0) = (0, 0) both scales cancel in â and b̂
but for the 1e-10 guard of Eq. 24, which would show at 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from metadcseg_jax import methods

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[bench]')")
F = pytest.importorskip("torch.nn.functional")
torch_ref = pytest.importorskip("metadcseg_jax.tools.torch_ref")

SIZE, WIDTH, BATCH, META_BATCH = 16, 2, 2, 3
LR, MOMENTUM, WD, ETA = 0.05, 0.9, 5e-4, 0.01
RTOL = 1e-12
_is_trace = lambda s: isinstance(s, optax.TraceState)


def _config():
  config = tiny.get_config()
  config.method = "l2b"
  config.model.name, config.model.width, config.model.dtype = "unet++", WIDTH, "float64"
  config.data.size = SIZE
  config.train.lr, config.train.momentum, config.train.weight_decay = LR, MOMENTUM, WD
  config.train.grad_clip = 0.0  # PyTorch's clip_grad_norm_ adds 1e-6 to the norm: not exact
  config.train.warmup_epochs = 0
  config.meta.route, config.meta.normalizer = "jvp", "image"
  config.meta.a0, config.meta.b0, config.meta.eta = 0.0, 0.0, ETA
  return config


def _batch(seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  labels = np.stack(
    [
      ((yy - rng.uniform(5, 11)) ** 2 + (xx - rng.uniform(5, 11)) ** 2 < rng.uniform(9, 25))
      for _ in range(BATCH + META_BATCH)
    ]
  ).astype(np.int32)
  return {
    "image": rng.standard_normal((BATCH, SIZE, SIZE, 1)),
    "noisy_label": labels[:BATCH],
    "meta_image": rng.standard_normal((META_BATCH, SIZE, SIZE, 1)),
    "meta_label": labels[BATCH:],
  }


def _torch_names(params):
  """A Flax U-Net++ parameter tree (or one shaped like it: the momentum buffer) as the
  NestedUNet's named tensors (conv kernels HWIO -> OIHW)."""
  out = {}
  for name, block in params.items():
    prefix = "final" if name == "final" else "blocks." + name.removeprefix("conv")
    layers = {"": block} if name == "final" else block
    for layer, p in layers.items():
      key = f"{prefix}.{layer}" if layer else prefix
      if "kernel" in p:
        out[f"{key}.weight"] = torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1).copy())
      else:
        out[f"{key}.weight"] = torch.from_numpy(np.array(p["scale"]))
      out[f"{key}.bias"] = torch.from_numpy(np.array(p["bias"]))
  return out


def _load_flax_state(model, opt, params, trace=None):
  """The Flax parameters (and SGD momentum buffer) into the NestedUNet and its optimizer."""
  missing, _ = model.load_state_dict(_torch_names(params), strict=False)
  assert not [k for k in missing if not k.endswith(("running_mean", "running_var", "tracked"))]
  if trace is not None:
    buffers = _torch_names(trace)
    for name, p in model.named_parameters():
      opt.state[p]["momentum_buffer"] = buffers[name].clone()


def _nchw(images):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def _torch_meta_weights(model, opt, batch):
  """L2B's code: the virtual step with create_graph, Ga, Gb of the meta loss at (0, 0)."""
  x, y = _nchw(batch["image"]), torch.from_numpy(batch["noisy_label"]).long()
  xv, yv = _nchw(batch["meta_image"]), torch.from_numpy(batch["meta_label"]).long()
  params = dict(model.named_parameters())
  buffers = dict(model.named_buffers())
  logits = torch.func.functional_call(model, (params, buffers), (x,))
  pseudo = logits.argmax(1).detach()
  f = F.cross_entropy(logits, y, reduction="none")
  g = F.cross_entropy(logits, pseudo, reduction="none")
  a = torch.zeros_like(f, requires_grad=True)
  b = torch.zeros_like(g, requires_grad=True)
  grads = torch.autograd.grad(
    (a * f + b * g).sum() / f.numel(), list(params.values()), create_graph=True
  )
  virtual = {}
  for (name, p), grad in zip(params.items(), grads):
    d = grad + WD * p
    buf = opt.state.get(p, {}).get("momentum_buffer")
    if buf is not None:
      d = d + MOMENTUM * buf
    virtual[name] = p - LR * d
  meta_loss = F.cross_entropy(torch.func.functional_call(model, (virtual, buffers), (xv,)), yv)
  ga, gb = torch.autograd.grad(meta_loss, (a, b))
  a_t, b_t = torch.clamp(-ETA * ga, min=0), torch.clamp(-ETA * gb, min=0)
  z = (a_t + b_t).sum(dim=(1, 2), keepdim=True)
  return a_t / (z + 1e-10), b_t / (z + 1e-10), pseudo


def _torch_real_step(model, opt, batch, a_hat, b_hat, pseudo):
  x, y = _nchw(batch["image"]), torch.from_numpy(batch["noisy_label"]).long()
  opt.zero_grad()
  logits = model(x)
  f = F.cross_entropy(logits, y, reduction="none")
  g = F.cross_entropy(logits, pseudo, reduction="none")
  ((a_hat * f + b_hat * g).sum(dim=(1, 2))).mean().backward()
  opt.step()


def _assert_close(got, want, what, scale=None):
  """To RTOL relative, the absolute floor RTOL times `scale` (default: the largest |want|)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.max(np.abs(want)) if scale is None else scale
  assert scale > 0, what
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def test_l2b_meta_weights_equal_pytorch_create_graph_step():
  with jax.enable_x64(True):
    method = methods.create(_config(), steps_per_epoch=100)
    state = method.init_state(jax.random.PRNGKey(0))
    torch.manual_seed(0)
    model = torch_ref.NestedUNet(2, 1, WIDTH).double()
    model.train()  # batch statistics in every forward, as the project's meta step
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    _load_flax_state(model, opt, state.params)
    weights = jax.jit(method.weights)
    step = jax.jit(method.train_step("main"))
    for i in range(2):  # step 0, then after one real step (a momentum buffer)
      batch = _batch(i)
      jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
      mo = weights(
        state, *(jbatch[k] for k in ("image", "noisy_label", "meta_image", "meta_label"))
      )
      a_hat, b_hat, pseudo = _torch_meta_weights(model, opt, batch)
      np.testing.assert_array_equal(np.asarray(mo.y_pseudo), pseudo.numpy())
      _assert_close(mo.a_hat, a_hat.detach().numpy(), f"step {i}: a_hat")
      _assert_close(mo.b_hat, b_hat.detach().numpy(), f"step {i}: b_hat")
      assert 0 < np.mean(np.asarray(mo.a_hat) > 0) < 1  # both sides of the rectifier
      state, _ = step(state, jbatch, jax.random.PRNGKey(i))
      _torch_real_step(model, opt, batch, a_hat.detach(), b_hat.detach(), pseudo)
      # The two real steps agree: every parameter and momentum buffer.
      (trace,) = [
        s.trace for s in jax.tree.leaves(state.opt_state, is_leaf=_is_trace) if _is_trace(s)
      ]
      want_params, want_buffers = _torch_names(state.params), _torch_names(trace)
      # A bias in front of BatchNorm has gradient 0 (rounding noise): the floor is the tree's.
      p_scale = max(float(v.abs().max()) for v in want_params.values())
      b_scale = max(float(v.abs().max()) for v in want_buffers.values())
      for name, p in model.named_parameters():
        _assert_close(p.detach().numpy(), want_params[name], f"after step {i}: {name}", p_scale)
        buf = opt.state[p]["momentum_buffer"].numpy()
        _assert_close(buf, want_buffers[name], f"after step {i}: buffer of {name}", b_scale)
      # The next meta step starts from the very same parameters and buffer on both sides: the
      # float64 rounding of the two frameworks' convolutions (~1e-16) would otherwise reach
      # ~2e-12 in â through the meta-gradients' cancellations.
      _load_flax_state(model, opt, state.params, trace)
