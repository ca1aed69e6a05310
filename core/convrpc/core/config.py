"""Defaults shared by the core, the server and the SDK, kept in one place."""

from __future__ import annotations

#: Port the server listens on and the SDK's demo connects to.
DEFAULT_PORT = 50051
#: Address the server binds by default: loopback, so nothing is exposed unless asked.
DEFAULT_HOST = "127.0.0.1"
#: Backend the server uses when none is configured.
DEFAULT_BACKEND = "numba"

#: Largest gRPC message either side accepts (bytes).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Largest element count of any one tensor in a request.
MAX_ELEMENTS = 64 * 1024 * 1024
#: Most steps one TrainKernel run may take.
MAX_TRAIN_STEPS = 1_000_000
#: Longest wall time one TrainKernel run may take (seconds).
MAX_TRAIN_SECONDS = 3600.0
#: Shortest interval between two streamed progress messages (seconds).
MIN_REPORT_INTERVAL = 0.05
#: Extra memory an op's im2col workspace may take (bytes).
WORKSPACE_BYTES = 256 * 1024 * 1024
