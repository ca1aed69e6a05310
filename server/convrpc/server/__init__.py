"""convrpc.server: the gRPC server (ConvService, health, reflection) over a convrpc.core backend."""

from .app import ConvServer, serve
from .settings import Settings

__all__ = ["ConvServer", "Settings", "serve"]
