"""convrpc.server: the gRPC server (ConvService, health, reflection) over a convrpc.core backend."""

from .app import ConvServer, serve
from .settings import ConfigError, Settings

__all__ = ["ConfigError", "ConvServer", "Settings", "serve"]
