"""convrpc: 2-D convolution compute as a gRPC service (``convrpc.client``, ``convrpc.server``, ``convrpc.core``).

The SDK's main names are importable from here (``from convrpc import ConvClient``), loaded on first use
so that ``import convrpc.core`` never imports grpc. The package spans the repository's ``proto/``,
``core/``, ``server/`` and ``client/`` directories: ``extend_path`` adds every ``convrpc`` directory on
``sys.path`` (an editable install lists all four; a wheel merges them into one).
"""

from __future__ import annotations

import importlib
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

#: Re-exported names and the module each comes from.
_EXPORTS = {
    "ConvClient": "convrpc.client",
    "ConvRpcError": "convrpc.client",
    "Gradients": "convrpc.client",
    "ServerInfo": "convrpc.client",
    "TrainResult": "convrpc.client",
    "TrainingRun": "convrpc.client",
    "AsyncConvClient": "convrpc.client.aio",
}

__all__ = ["__version__", *_EXPORTS]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convrpc")
    except PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'convrpc' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
