"""Edge detectors used for the DCD boundary region (MetaDCSeg Eq. 8): PiDiNet."""

from metadcseg_jax.edges.pidinet import edge_probability
from metadcseg_jax.edges.pidinet import load_pidinet
from metadcseg_jax.edges.pidinet import PiDiNet
from metadcseg_jax.edges.pidinet import pidinet_edges
from metadcseg_jax.edges.pidinet import read_torch_zip

__all__ = ["PiDiNet", "edge_probability", "load_pidinet", "pidinet_edges", "read_torch_zip"]
