"""metadcseg-jax: MetaDCSeg (pixel-wise meta-learned weights + Dynamic Center Distance) in JAX."""

__version__ = "0.1.0"
