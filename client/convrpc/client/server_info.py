"""ServerInfo: what ``ConvClient.server_info()`` returns, the GetServerInfo response as named Python values."""

from __future__ import annotations

from dataclasses import dataclass

from convrpc.v1 import conv_service_pb2 as pb

__all__ = ["ServerInfo"]


@dataclass(frozen=True)
class ServerInfo:
    """A server's version, compute backend and limits.

    Attributes
    ----------
    version : str
        The convrpc version the server runs.
    backend : str
        The compute backend: ``"numba"``, ``"numpy"`` or ``"cupy"``.
    device : str
        Where it computes, e.g. ``"cpu"`` or a GPU's name.
    max_message_bytes : int
        The largest gRPC message it accepts; the SDK splits or streams what is larger.
    max_elements : int
        The most elements one tensor may have.
    max_train_steps : int
        The most steps one ``train_kernel`` run may take.
    max_train_seconds : float
        The longest one ``train_kernel`` run may take (seconds).
    ops : tuple of str
        The ops it computes, e.g. ``("conv2d", ..., "relu")``.
    dtypes : tuple of str
        The element types its wire carries, e.g. ``("float32", "float64")``.
    compute_threads : int
        Threads one op computes with.
    """

    version: str
    backend: str
    device: str
    max_message_bytes: int
    max_elements: int
    max_train_steps: int
    max_train_seconds: float
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    compute_threads: int

    @classmethod
    def from_response(cls, response: pb.GetServerInfoResponse) -> "ServerInfo":
        return cls(
            version=response.version,
            backend=response.backend,
            device=response.device,
            max_message_bytes=response.max_message_bytes,
            max_elements=response.max_elements,
            max_train_steps=response.max_train_steps,
            max_train_seconds=response.max_train_seconds,
            ops=tuple(response.ops),
            dtypes=tuple(pb.Dtype.Name(d).removeprefix("DTYPE_").lower() for d in response.dtypes),
            compute_threads=response.compute_threads,
        )

    def __str__(self) -> str:
        """One ``name: value`` line per field (what ``convrpc info`` prints)."""
        width = max(len(name) for name in self.__dataclass_fields__)
        lines = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            shown = ", ".join(value) if isinstance(value, tuple) else value
            lines.append(f"{name:<{width}}  {shown}")
        return "\n".join(lines)
