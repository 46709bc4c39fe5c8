"""xpnn: explicit forward/backward layers written once against the array API standard.

The same network code runs on NumPy (``"cpu"``), CuPy (``"gpu"``),
array-api-strict and PyTorch; pick one with :func:`set_backend`, the
``XPNN_BACKEND`` environment variable or ``--backend`` on the command line.
"""
from xpnn.backend import (
    Backend,
    BackendUnavailableError,
    get_backend,
    get_default_dtype,
    host_random,
    make_backend,
    seed,
    set_backend,
    set_default_dtype,
    set_random_source,
    to_numpy,
    use_backend,
)
from xpnn.network import NeuralNetwork

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendUnavailableError", "NeuralNetwork", "get_backend", "get_default_dtype",
    "host_random", "make_backend", "seed", "set_backend", "set_default_dtype",
    "set_random_source", "to_numpy", "use_backend",
]
