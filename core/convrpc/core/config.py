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
#: Largest value of any geometry integer (kernel size, stride, padding, dilation, groups, divisor): keeps
#: every size, tap count and flat index a kernel computes within int64.
MAX_GEOMETRY_INT = 2**31 - 1
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

# Keepalive, shared by server and SDK so that long, quiet training streams stay open through NATs and
# load balancers and a dead peer is noticed. The server must accept pings at least as often as the SDK
# sends them (MIN_PING_INTERVAL_MS <= KEEPALIVE_TIME_MS), or it answers GOAWAY "too_many_pings".
#: Interval between keepalive pings on a connection with a call open (milliseconds).
KEEPALIVE_TIME_MS = 30_000
#: How long a ping may go unanswered before the connection is considered dead (milliseconds).
KEEPALIVE_TIMEOUT_MS = 10_000
#: Shortest interval between client pings the server tolerates (milliseconds).
MIN_PING_INTERVAL_MS = 10_000

# -- data path (measured by bench/transport.py; see the README's "Moving tensors fast") -------------

#: Size of one chunk of a ForwardStream/BackwardStream payload (bytes): 1-2 MiB beat 64-512 KiB and 4 MiB.
CHUNK_BYTES = 1024 * 1024
#: Requests whose tensors hold more bytes than this go through the chunked streams, not the unary RPCs
#: (relu round trip on loopback: unary 1.3 ms vs stream 2.6 ms at 64 KiB, 4.3 vs 3.3 ms at 256 KiB).
STREAM_THRESHOLD_BYTES = 128 * 1024
#: Requests whose tensors hold more bytes than this go through shared memory when the server is local
#: (1.2 ms vs unary 1.3 ms at 64 KiB, 2.2 vs 12.5 ms at 1 MiB).
SHM_THRESHOLD_BYTES = 64 * 1024
#: Seconds a shared-memory output region the client never unlinked lives before the server unlinks it.
SHM_OUTPUT_TTL = 60.0
#: Seconds a shared-memory session may stay unused before the server forgets it.
SHM_SESSION_TTL = 3600.0
#: HTTP/2 and TCP tuning both server and SDK apply: bigger frames and socket reads for bulk tensors.
#: Measured (bench/transport.py --grpc-defaults) it gains 0-25% on 16-64 MiB streams, within noise
#: on a busy 2-core machine; larger flow-control windows, no BDP probing and a bigger write buffer
#: gained nothing, so they are left at gRPC's defaults.
TRANSPORT_OPTIONS = (
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
    ("grpc.experimental.tcp_read_chunk_size", 4 * 1024 * 1024),
    ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 1024 * 1024),
)


def transport_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel arguments for bulk tensors, the same on both ends (names as grpc spells them)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *TRANSPORT_OPTIONS,
    ]
