"""convrpc.core: the compute core (pure math, no gRPC): ops, gradients, kernel fitting and networks.

``get_backend(name)`` returns a :class:`Backend` whose methods are named, ordered and defaulted like
``torch.nn.functional`` (and like the SDK's): ``conv2d``, ``conv_transpose2d``, ``max_pool2d``,
``avg_pool2d``, ``relu`` and a ``<op>_backward`` for each, returning :class:`Gradients`. Kernel
fitting is :mod:`convrpc.core.training`; chains of torch.nn-named layers run forward, backward and
trained on a backend are :mod:`convrpc.core.network`.
"""

from __future__ import annotations

import importlib
import logging
import threading

from .backend import DTYPES, OPS, Backend, Gradients
from .errors import BackendUnavailableError, ConvError, InvalidArgumentError, ResourceExhaustedError

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "BACKENDS",
    "ConvError",
    "DTYPES",
    "Gradients",
    "InvalidArgumentError",
    "OPS",
    "ResourceExhaustedError",
    "available_backends",
    "get_backend",
    "resolve_backend_name",
]

#: Backend name -> (module holding its kernel table, pip extra that provides it).
BACKENDS = {
    "numpy": ("convrpc.core.numpy_backend", None),
    "numba": ("convrpc.core.numba_backend", "server"),
    "cupy": ("convrpc.core.cupy_backend", "gpu"),
}

_log = logging.getLogger("convrpc.core")
_lock = threading.Lock()
_cache: dict[str, Backend] = {}


def get_backend(name: str = "numba") -> Backend:
    """The backend called ``name`` ("numpy", "numba" or "cupy"), created once per process.

    Raises :class:`BackendUnavailableError` naming the pip extra to install when this install or
    machine cannot run it. ``"auto"`` picks one with :func:`resolve_backend_name`.
    """
    if name == "auto":
        name = resolve_backend_name(name)
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    with _lock:
        if name not in _cache:
            module_name, extra = BACKENDS[name]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                hint = f"; install it with: pip install -e '.[{extra}]' in a clone of convrpc" if extra else ""
                raise BackendUnavailableError(f"backend {name!r} is not available ({exc}){hint}") from None
            device = getattr(module, "DEVICE", "cpu")
            if callable(device):
                device = device()
            _cache[name] = Backend(name, module, device)
        return _cache[name]


def available_backends() -> list[str]:
    """Names of the backends this install and machine can run, in order of preference."""
    names = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def resolve_backend_name(name: str) -> str:
    """``name`` itself, except that ``"auto"`` becomes "cupy" when CuPy imports and a CUDA device is
    visible, else "numba" when it is installed, else "numpy"; the choice is logged."""
    if name != "auto":
        return name
    reasons = []
    for candidate in ("cupy", "numba"):
        try:
            backend = get_backend(candidate)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
            continue
        _log.info("backend 'auto' resolved to %r on %s", candidate, backend.device)
        return candidate
    _log.info("backend 'auto' resolved to 'numpy' (%s)", "; ".join(reasons))
    return "numpy"
