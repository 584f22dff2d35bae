"""Users' folders built on the fly for the tests: 2D images with trusted masks, and volumes
in the Decathlon layout."""

import json

import nibabel as nib
import numpy as np
from PIL import Image

from experiments.configs import tiny

SIZE = 32


def disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def write_folder(root, n=24, trusted=(), *, shift=4, seed=0):
  """images/, masks/ (the user's masks: each disc shifted by `shift` px) and, for `trusted`
  indices, trusted/ (the true discs). Returns {stem: (true mask, given mask)}."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "masks") + (("trusted",) if trusted else ()):
    (root / sub).mkdir(parents=True, exist_ok=True)
  truth = {}
  for i in range(n):
    stem = f"case{i:02d}"
    cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 8)
    true = disc(SIZE, SIZE, cy, cx, r)
    given = disc(SIZE, SIZE, cy, cx + shift, r)
    image = (true * 120 + rng.integers(0, 80, (SIZE, SIZE))).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(given * 255).save(root / "masks" / f"{stem}.png")
    if i in trusted:
      Image.fromarray(true * 255).save(root / "trusted" / f"{stem}.png")
    truth[stem] = (true, given)
  return truth


def folder_config(root, data_dir, **data):
  config = tiny.get_config()
  config.method = "ce"
  config.data.name = "folder"
  config.data.manual_dir = str(root)
  config.data.data_dir = str(data_dir)
  config.data.size = SIZE
  config.data.noise.kind = "none"
  config.data.noise.calibrate = False
  config.data.update(data)
  return config


CLASSES = ("background", "edema", "core")


def write_decathlon(root, n=5, shape=(16, 16, 4), seed=0):
  """A Decathlon-layout folder of n tiny NIfTI volumes with three classes; a non-identity
  affine with anisotropic voxels (0.8 x 0.8 x 2.5 mm). Returns {case: labels (X,Y,Z)}."""
  rng = np.random.default_rng(seed)
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  affine = np.diag([0.8, 0.8, 2.5, 1.0])
  affine[:3, 3] = (-10.0, 4.0, 30.0)
  labels = {}
  for i in range(n):
    case = f"vol_{i:03d}"
    lab = np.zeros(shape, np.uint8)
    cx, cy = rng.integers(5, 11, 2)
    for z in range(shape[2]):
      lab[..., z] = disc(shape[0], shape[1], cx, cy, 4 + (z % 2))
      lab[..., z] += disc(shape[0], shape[1], cx, cy, 2)
    image = lab * 50.0 + rng.normal(100, 10, shape)
    nib.save(
      nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{case}.nii.gz"
    )
    nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"{case}.nii.gz")
    labels[case] = lab
  info = {
    "name": "Tiny",
    "modality": {"0": "MRI"},
    "labels": {str(k): v for k, v in enumerate(CLASSES)},
    "training": [
      {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in labels
    ],
  }
  (root / "dataset.json").write_text(json.dumps(info))
  return labels, affine
