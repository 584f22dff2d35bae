"""PyTorch reference for the step's speed: NestedUNet + an L2B-style meta step.

Imported by `metadcseg-speed` when torch is installed (the extra `bench`; not a dependency). The
model is the widely used NestedUNet (4uiiurz1/pytorch-nested-unet) with the same layout as
`metadcseg_jax.core.models.UNetPlusPlus`; the meta step is what L2B's code does through `higher`:
a functional forward, `torch.autograd.grad(..., create_graph=True)` for the virtual SGD step
(momentum buffer, weight decay), the meta loss at the virtual parameters, the gradient of that
with respect to the per-pixel weights, then the real weighted step.
"""

import statistics
import time

import torch
from torch import nn
from torch.func import functional_call
import torch.nn.functional as F


class VGGBlock(nn.Module):
  def __init__(self, cin, cmid, cout):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, cmid, 3, padding=1), nn.BatchNorm2d(cmid)
    self.conv2, self.bn2 = nn.Conv2d(cmid, cout, 3, padding=1), nn.BatchNorm2d(cout)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(x)))


class NestedUNet(nn.Module):
  def __init__(self, num_classes, in_ch, width):
    super().__init__()
    nb = [width * m for m in (1, 2, 4, 8, 16)]
    self.pool = nn.MaxPool2d(2)
    self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    self.blocks = nn.ModuleDict()
    for i in range(5):
      self.blocks[f"{i}_0"] = VGGBlock(in_ch if i == 0 else nb[i - 1], nb[i], nb[i])
    for j in range(1, 5):
      for i in range(5 - j):
        self.blocks[f"{i}_{j}"] = VGGBlock(nb[i] * j + nb[i + 1], nb[i], nb[i])
    self.final = nn.Conv2d(nb[0], num_classes, 1)

  def forward(self, x):
    xs = {}
    for i in range(5):
      xs[(i, 0)] = self.blocks[f"{i}_0"](x if i == 0 else self.pool(xs[(i - 1, 0)]))
    for j in range(1, 5):
      for i in range(5 - j):
        cat = [xs[(i, k)] for k in range(j)] + [self.up(xs[(i + 1, j - 1)])]
        xs[(i, j)] = self.blocks[f"{i}_{j}"](torch.cat(cat, 1))
    return self.final(xs[(0, 4)])


def _sync():
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _median_time(fn, repeats):
  fn()  # warm-up
  _sync()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    _sync()  # CUDA kernels run asynchronously
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_steps(size, width, channels, batch, repeats, lr=0.05, momentum=0.9, wd=5e-4, device=None):
  """Median seconds of a plain CE step and of an L2B-style meta step (on the GPU if torch
  sees one, else the CPU).

  Args:
    size, width, channels: image size, U-Net++ width and input channels.
    batch: the batch (and meta batch).
    repeats: the timed steps (median).
    lr, momentum, wd: SGD's settings.
    device: "cuda" or "cpu" (None: the GPU if torch sees one).
  """
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model = NestedUNet(2, channels, width).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
  x = torch.randn(batch, channels, size, size, device=device)
  y = (torch.rand(batch, size, size, device=device) > 0.5).long()
  xv, yv = torch.randn(batch, channels, size, size, device=device), y.clone()

  def plain():
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()

  names = [n for n, _ in model.named_parameters()]

  def l2b():
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    logits = functional_call(model, (params, buffers), (x,))
    pseudo = logits.argmax(1).detach()
    f = F.cross_entropy(logits, y, reduction="none")
    g = F.cross_entropy(logits, pseudo, reduction="none")
    eps_a = torch.zeros_like(f, requires_grad=True)
    eps_b = torch.zeros_like(g, requires_grad=True)
    grads = torch.autograd.grad(
      (eps_a * f + eps_b * g).sum(), list(params.values()), create_graph=True
    )
    new = {}
    for n, p, gr in zip(names, params.values(), grads):
      buf = opt.state.get(p, {}).get("momentum_buffer")
      d = gr + wd * p
      if buf is not None:
        d = d + momentum * buf
      new[n] = p - lr * d
    meta_loss = F.cross_entropy(functional_call(model, (new, buffers), (xv,)), yv)
    ga, gb = torch.autograd.grad(meta_loss, (eps_a, eps_b))
    a, b = torch.clamp(-ga, min=0), torch.clamp(-gb, min=0)
    z = (a + b).sum(dim=(1, 2), keepdim=True) + 1e-10
    a, b = a / z, b / z
    opt.zero_grad()
    logits = model(x)
    loss = (
      (
        a * F.cross_entropy(logits, y, reduction="none")
        + b * F.cross_entropy(logits, pseudo, reduction="none")
      ).sum(dim=(1, 2))
    ).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
    opt.step()

  model.train()
  return {"plain": _median_time(plain, repeats), "l2b": _median_time(l2b, repeats)}
