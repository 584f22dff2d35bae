"""metadcseg-jax: MetaDCSeg (pixel-wise meta-learned weights + Dynamic Center Distance) in JAX.

model = metadcseg_jax.load_model("runs/mine")   # a finished run, or an exported model
mask = model.predict("new_image.png")           # in the input's own size and geometry
"""

from metadcseg_jax.inference.model import load_model

__all__ = ["load_model"]
__version__ = "0.3.0"
