"""probloss: probabilistic losses for PyTorch that do not break."""

from . import audit, distributions, functional, metrics, nn, special, vae

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "audit",
    "distributions",
    "functional",
    "metrics",
    "nn",
    "special",
    "vae",
]
