r"""Is the synthetic set a fair proxy for real scans? Compares its images and masks with real
samples on what matters to noise-robust segmentation and to DCD.

    python -m experiments.proxy_check --kvasir=/path/to/Kvasir-SEG \
        --brats=/path/to/brats_sample --pidinet=/path/to/table5_pidinet.pth

Per dataset (the synthetic set at 64 px; Kvasir-SEG images; BraTS FLAIR slices with tumour,
whole tumour = label > 0), all resized to --size:
  * foreground share and objects per image;
  * boundary contrast: |mean inside − mean outside| over 3-px bands at the boundary, divided by
    the intensity std of the background (a contrast-to-noise ratio);
  * texture: mean Sobel magnitude away from the boundary over that at the boundary (below 1:
    the boundary is the strongest structure; near or above 1: texture competes with it);
  * for each edge detector (Sobel top 5%, Canny at σ 1/2/3, PiDiNet when weights are given):
    the share of its edge pixels within 2 px of the true boundary (precision) and the share of
    boundary pixels within 2 px of an edge (recall);
  * the corruption 1 − Dice of the L2B levels, with the published kernels and calibrated.
Prints a markdown table.
"""

import pathlib

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image
from scipy import ndimage

from metadcseg_jax.core import edges as edges_lib
from metadcseg_jax.core.edges import pidinet
from metadcseg_jax.data import noise
from metadcseg_jax.data import readers
from metadcseg_jax.data import synthetic
from metadcseg_jax.data.noise import calibrate

_KVASIR = flags.DEFINE_string("kvasir", "", "Kvasir-SEG folder (images/, masks/).")
_BRATS = flags.DEFINE_string("brats", "", "Folder of BraTS cases (*/Flair*.nii.gz, OT*.nii.gz).")
_PIDINET = flags.DEFINE_string("pidinet", "", "PiDiNet weights (table5_pidinet.pth).")
_SIZE = flags.DEFINE_integer("size", 64, "Image side every dataset is resized to.")
_N = flags.DEFINE_integer("n", 200, "Synthetic images.")
_EXPORT = flags.DEFINE_string(
  "export_brats",
  "",
  "Also write the BraTS slices (z-scored FLAIR as float TIFF, masks as PNG) "
  "to this folder: a dataset for --config.data.name=folder, to train on real data.",
)


def _synthetic(n: int, size: int):
  images, labels = synthetic.make_split(0, "train", n, size, 1)
  return list(images), list(labels)


def _kvasir(root: pathlib.Path, size: int):
  root = root / "Kvasir-SEG" if (root / "Kvasir-SEG").is_dir() else root
  images, labels = [], []
  for path in sorted((root / "images").glob("*.jpg")):
    image, _ = readers.read_image(path, channels=3)
    mask = readers.mask_to_label(
      readers.read_mask(root / "masks" / path.name), path=path, threshold=127
    )
    images.append(readers.resize_image(image, size))
    labels.append(readers.resize_label(mask, size))
  return images, labels


def _brats(root: pathlib.Path, size: int):
  images, labels = [], []
  for case in sorted(p for p in root.iterdir() if p.is_dir()):
    flair = readers.read_volume(next(case.glob("Flair*.nii*")))
    label = readers.read_volume(next(case.glob("OT*.nii*"))) > 0
    flair = readers.zscore(flair, region=flair != 0)
    for k in np.flatnonzero(label.reshape(len(label), -1).sum(1) > 50):
      images.append(readers.resize_image(flair[k][..., None], size))
      labels.append(readers.resize_label(label[k].astype(np.uint8), size))
  return images, labels


def _export(images, labels, folder: pathlib.Path) -> None:
  (folder / "images").mkdir(parents=True, exist_ok=True)
  (folder / "masks").mkdir(parents=True, exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image[..., 0].astype(np.float32), mode="F").save(
      folder / "images" / f"slice{i:04d}.tif"
    )
    Image.fromarray((label > 0).astype(np.uint8) * 255).save(folder / "masks" / f"slice{i:04d}.png")


def _boundary(mask: np.ndarray) -> np.ndarray:
  mask = mask > 0
  return mask ^ ndimage.binary_erosion(mask)


def _stats(images, labels, detectors) -> dict[str, float]:
  out = {"images": len(images)}
  fg = [lab > 0 for lab in labels]
  out["fg share"] = float(np.mean([f.mean() for f in fg]))
  out["objects"] = float(np.mean([ndimage.label(f)[1] for f in fg]))
  cnr, tex = [], []
  prec = {d: [] for d in detectors}
  rec = {d: [] for d in detectors}
  for image, f in zip(images, fg):
    grey = image.mean(-1)
    dist_in = ndimage.distance_transform_edt(f)
    dist_out = ndimage.distance_transform_edt(~f)
    inner, outer = (dist_in > 0) & (dist_in <= 3), (dist_out > 0) & (dist_out <= 3)
    background = dist_out > 6
    if inner.any() and outer.any() and background.sum() > 10:
      cnr.append(abs(grey[inner].mean() - grey[outer].mean()) / (grey[background].std() + 1e-9))
    sobel = np.asarray(edges_lib.sobel_magnitude(image.astype(np.float32)))
    bd = _boundary(f)
    close_to_bd = ndimage.distance_transform_edt(~bd) <= 2
    if bd.any() and (~close_to_bd).any():
      tex.append(sobel[~close_to_bd].mean() / (sobel[close_to_bd].mean() + 1e-9))
    for name, detect in detectors.items():
      e = detect(image)
      if e.any():
        prec[name].append(close_to_bd[e].mean())
      if bd.any():
        rec[name].append((ndimage.distance_transform_edt(~e) <= 2)[bd].mean() if e.any() else 0.0)
  out["boundary CNR"] = float(np.median(cnr))
  out["texture / boundary gradient"] = float(np.median(tex))
  for name in detectors:
    out[f"{name} precision"] = float(np.mean(prec[name])) if prec[name] else float("nan")
    out[f"{name} recall"] = float(np.mean(rec[name])) if rec[name] else float("nan")
  masks = np.stack(labels).astype(np.uint8)
  for kind in ("l2b20", "l2b40", "l2b60"):
    published = noise.corrupt_masks(masks, kind=kind, seed=0)
    out[f"{kind} published"] = float(noise.measured_corruption(masks, published).mean())
    out[f"{kind} calibrated"] = calibrate.calibrate(masks, kind=kind, seed=0)["corruption"]
  return out


def main(argv):
  del argv
  size = _SIZE.value
  detectors = {
    "sobel 5%": lambda im: np.asarray(edges_lib.sobel_edges(im.astype(np.float32))),
    **{f"canny σ{s}": (lambda im, s=s: edges_lib.canny_edges(im, sigma=s)) for s in (1, 2, 3)},
  }
  if _PIDINET.value:
    module, variables = pidinet.load_pidinet(_PIDINET.value)
    run = jax.jit(lambda x: pidinet.pidinet_edges(module, variables, x))
    detectors["pidinet"] = lambda im: np.asarray(run(im[None].astype(np.float32)))[0]
  datasets = {"synthetic": _synthetic(_N.value, size)}
  if _KVASIR.value:
    datasets["kvasir sample"] = _kvasir(pathlib.Path(_KVASIR.value), size)
  if _BRATS.value:
    datasets["brats sample"] = _brats(pathlib.Path(_BRATS.value), size)
    if _EXPORT.value:
      _export(*_brats(pathlib.Path(_BRATS.value), 128), pathlib.Path(_EXPORT.value))
  table = {name: _stats(*data, detectors) for name, data in datasets.items()}
  keys = list(next(iter(table.values())))
  print(f"All at {size}x{size}.\n")
  print("| measure | " + " | ".join(table) + " |")
  print("|---|" + "---|" * len(table))
  for k in keys:
    print(f"| {k} | " + " | ".join(f"{table[d][k]:.3g}" for d in table) + " |")


if __name__ == "__main__":
  app.run(main)
