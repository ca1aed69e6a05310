"""Client defaults: message limits, keepalive, data-path thresholds and failover timings, in one place."""

from __future__ import annotations

#: Largest gRPC message the SDK sends or accepts (bytes); the server's default limit too.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# A frozen replica (SIGSTOP, a hung VM) still completes TCP handshakes and ACKs bytes in its kernel but never
# answers HTTP/2 PINGs. Pinging every second during calls turns it into UNAVAILABLE within ~3 s, whatever the
# compute time; the server accepts pings that often. Measured with grpcio 1.85: the ping timeout
# (grpc.http2.ping_timeout_ms) is what fails the call; without it an in-flight call waited for its deadline.
#: Interval between pings on a connection with a call open (milliseconds).
KEEPALIVE_TIME_MS = 1000
#: How long a ping may go unanswered before the connection and its calls fail UNAVAILABLE (milliseconds).
KEEPALIVE_TIMEOUT_MS = 2000
#: Longest connection attempt (milliseconds): a frozen server otherwise holds new calls 20 s (waiting for
#: its SETTINGS frame) before they fail; after one failed attempt new calls fail at once until a reconnect.
CONNECT_TIMEOUT_MS = 2000

# -- data paths (measured by bench/transport.py; see the README's "Moving tensors fast") -------------

#: Longest a side-channel read or write may wait (seconds) before the replica counts as UNAVAILABLE: like
#: the keepalive, it turns a frozen replica into a failover within ~3 s, while the call's bytes are moving.
SIDE_CHANNEL_STALL_SECONDS = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
#: Size of one chunk of a ForwardStream/BackwardStream payload (bytes): 1-2 MiB beat 64-512 KiB and 4 MiB.
CHUNK_BYTES = 1024 * 1024
#: Requests whose tensors hold more bytes than this go through the chunked streams, not the unary RPCs
#: (relu round trip on loopback: unary 1.3 ms vs stream 2.6 ms at 64 KiB, 4.3 vs 3.3 ms at 256 KiB).
STREAM_THRESHOLD_BYTES = 128 * 1024
#: Requests whose tensors hold more bytes than this go through shared memory when the server is local
#: (1.2 ms vs unary 1.3 ms at 64 KiB, 2.2 vs 12.5 ms at 1 MiB).
SHM_THRESHOLD_BYTES = 64 * 1024
#: Bytes of shared-memory regions a client holds at most (idle, staging and those its results and
#: ``empty``/``asarray`` arrays view); past it a call takes the network and ``empty`` gives ordinary memory.
SHM_POOL_BYTES = 8 * 1024 * 1024 * 1024
#: Bytes of warm memory kept to receive streams' large results into (``convrpc.buffers``): a buffer is
#: reused once the caller freed every array on it; fresh pages cost their faults and zeroing every call.
STREAM_BUFFER_BYTES = 512 * 1024 * 1024

# -- sharding and failover ----------------------------------------------------------------------------

#: Shards of one call in flight at once: a server admits 8 compute RPCs by default, so even a single
#: replica never turns one client's shards away as busy.
SHARDS_IN_FLIGHT = 8
#: Bytes of a message kept free for framing, shapes and op options when sizing shards by the message limit.
FRAMING_BYTES = 64 * 1024
#: Pauses (seconds) before the attempts that follow one attempt per replica: time for a channel whose name
#: resolves to several addresses to notice one is gone, so that its load balancer stops picking it.
RETRY_PAUSES = (0.05, 0.25)
#: Seconds a replica that failed UNAVAILABLE is passed over before a health check may bring it back;
#: doubled after every failed check, up to EJECT_MAX_SECONDS.
EJECT_SECONDS = 1.0
EJECT_MAX_SECONDS = 30.0
#: Deadline of the health check that brings an ejected replica back (seconds).
PROBE_TIMEOUT = 1.0

# -- training runs ------------------------------------------------------------------------------------

#: Deadline of the StopTraining call that cancel(), leaving a run's loop or its timeout sends (seconds).
STOP_TIMEOUT = 10.0
#: A run given ``timeout=T`` is asked to stop at T; its stream fails DEADLINE_EXCEEDED only if the result
#: has not come this many seconds later (a server that stopped answering), so a healthy run keeps its fit.
STOP_GRACE_SECONDS = 30.0
