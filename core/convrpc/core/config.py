"""Defaults of the core and the server, kept in one place (the SDK's channel, keepalive and data-path
defaults are in convrpc.client.config, the server's channel options in convrpc.server.settings)."""

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
#: Largest value of any geometry integer (kernel size, stride, padding, dilation, groups, divisor): keeps
#: every size, tap count and flat index a kernel computes within int64.
MAX_GEOMETRY_INT = 2**31 - 1
#: Most floating-point operations one op call may cost, estimated from its geometry: about 2 minutes of
#: the numba conv2d on a busy 2-core machine (7.7 GFLOP/s measured), a quarter of that alone. A request
#: over it is refused before anything is allocated, where it used to hold a slot and a CPU for hours.
MAX_OP_FLOPS = 1e12
#: The conv2d flops one pooling window tap costs as much time as: the numba max_pool2d ran 1.0-1.7e8
#: taps/s where conv2d ran 7.7e9 flop/s on the same machine.
POOL_TAP_FLOPS = 64
#: Extra memory an op's im2col workspace may take (bytes).
WORKSPACE_BYTES = 256 * 1024 * 1024

#: Compute RPCs (Forward, Backward, TrainKernel) a server admits at once; more are refused at once. The
#: SDK sends at most this many shards of one call at a time, so one client never trips it alone.
MAX_CONCURRENT_RPCS = 8
#: Fewest slots of max_concurrent_rpcs = 0 ("one per CPU", the lowest-latency choice on a dedicated machine).
MIN_COMPUTE_SLOTS = 2
#: RPCs that may wait for a server handler thread before gRPC refuses new ones.
MAX_QUEUED_RPCS = 64
#: Seconds in-flight RPCs get to finish when a server shuts down.
GRACE_SECONDS = 10.0

# -- data path (measured by bench/transport.py; see the README's "Moving tensors fast") -------------

#: Size of one chunk of a ForwardStream/BackwardStream payload (bytes): 1-2 MiB beat 64-512 KiB and 4 MiB.
CHUNK_BYTES = 1024 * 1024
#: Seconds a shared-memory session may wait for its socket connection (the SDK connects at once), and a
#: connection for its token, before the server drops it.
SHM_CONNECT_SECONDS = 30.0
#: Shared-memory sessions a server holds at once: each is a connected client process.
SHM_MAX_SESSIONS = 256
#: Regions one session may hand over at once. Each is a mapping in the server, and a process has at most
#: vm.max_map_count (65530) of them, numpy's large allocations included: 256 x 128 stays far below.
SHM_MAX_REGIONS = 128
#: Bytes of client regions a server maps at once, all sessions together: address space, not memory (a
#: mapping commits only what is touched), but 128 x 256 regions of 4 GiB would be more than x86-64 has.
SHM_MAX_MAPPED_BYTES = 1 << 40
#: Largest shared-memory region a request may name: a request's tensors and results fit in far less.
SHM_MAX_REGION_BYTES = 4 * 1024 * 1024 * 1024
#: Seconds a connection without calls stays open (400 idle connections used to hold 400 files forever).
MAX_CONNECTION_IDLE = 300.0
#: Seconds a stream may wait on its client, for a message or for room to send, before it is cancelled.
STREAM_IDLE_TIMEOUT = 30.0
#: Longest one ForwardStream/BackwardStream call may take (seconds): 4 GiB at the slowest measured rate.
STREAM_MAX_SECONDS = 600.0
#: Warm memory a server keeps to receive large stream payloads into (bytes): fresh pages cost a fault and
#: zeroing each, 250-410 ms against 150-240 ms to receive 256 MiB on loopback here.
STREAM_BUFFER_BYTES = 512 * 1024 * 1024
#: Seconds a side-channel token stays valid: the SDK connects within milliseconds of receiving it.
SIDE_CHANNEL_TOKEN_SECONDS = 10.0
