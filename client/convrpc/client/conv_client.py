"""ConvClient: the synchronous SDK, numpy arrays in and out."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
import grpc

from convrpc.v1 import conv_service_pb2 as pb

from . import config
from .calls import Gather, Sleep, Spawn, Stream, drive
from .ops import OpMethods
from .training import TrainingRun

__all__ = ["ConvClient"]


class ConvClient(OpMethods):
    """A client of one or more convrpc servers.

    ``target`` is ``"host:port"``, a gRPC name such as ``"dns:///convrpc:50051"`` (every address it
    resolves to is used round-robin), or a list of those (calls rotate over them). ``timeout`` is the
    default deadline of every op call in seconds (None: no deadline); each method also takes
    ``timeout=``. A training run is not bounded by it: ``train_kernel(timeout=T)`` stops a run at T
    and keeps its result. ``token`` is sent as a bearer token; ``root_certificates`` (PEM bytes) switches to
    TLS, and ``private_key``/``certificate_chain`` add a client certificate for mutual TLS.
    ``data_path`` picks how tensors travel: ``"auto"`` (unary for small requests, shared memory to
    a server on this host, chunked streams otherwise), or ``"unary"``, ``"stream"``, ``"shm"`` to
    force one; ``chunk_bytes`` overrides the stream chunk size. ``empty``/``asarray`` give arrays in
    the client's shared memory, sent to a local server with no copy; results of shared-memory calls
    view it too, and the client's regions hold at most ``shm_pool_bytes``. A stream moves its bytes
    over the server's side channel (a raw TCP socket its RPC hands out a one-time token for) when the
    server offers one; ``side_channel=False`` keeps them on the gRPC stream. A stream's large results are
    received into warm memory the client keeps, at most ``stream_buffer_bytes`` (0: none), reused once the
    arrays of an earlier call on it are freed.

    Forward and Backward calls whose batch exceeds ``shard_size`` (None: no limit) are split along N
    and run concurrently over the replicas, on any data path, as are unary requests too large for one
    message; the result is the unsharded one. A call or shard failing with UNAVAILABLE, or whose
    replica stops answering, is sent to another replica within the call's deadline.
    Networks (:mod:`convrpc.client.nn`) are computed with ``forward``/``backward`` (one call each, the
    whole chain on the server, sharded and failed over like an op) and fitted with ``train``.
    ``train_kernel`` and ``train`` run on one replica (see :mod:`convrpc.client.calls`), and their stop
    request goes to the same one. Use it as a context manager or call ``close()``; calls on a closed client
    raise ConvRpcError(FAILED_PRECONDITION).
    """

    _grpc = grpc

    def _start(self) -> None:
        self._pool = ThreadPoolExecutor(config.SHARDS_IN_FLIGHT, thread_name_prefix="convrpc-shard")

    def _run(self, steps, finish):
        self._check_open()
        return finish(self._drive(steps))

    def _drive(self, generator):
        return drive(generator, self._do)

    def _background(self, generator) -> None:
        with contextlib.suppress(Exception):  # a health check racing close(): nobody waits for it
            self._drive(generator)

    def _do(self, effect):
        if isinstance(effect, Sleep):
            return time.sleep(effect.seconds)
        if isinstance(effect, Spawn):
            return threading.Thread(target=self._background, args=(effect.steps,), daemon=True).start()
        if isinstance(effect, Gather):
            futures = [self._pool.submit(self._drive, part) for part in effect.parts]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        method = self._methods[effect.replica.index][effect.method]
        if isinstance(effect, Stream):
            call = method(effect.messages, timeout=effect.timeout, metadata=self._metadata)
            if effect.on_end is not None:
                call.add_done_callback(lambda _: effect.on_end())
            try:
                for message in call:
                    effect.receive(message)
            except BaseException:
                call.cancel()
                raise
            return None
        return method(effect.request, timeout=effect.timeout, metadata=self._metadata)

    def _train(self, request, progress, timeout, *, rpc="TrainKernel", name="train_kernel", make_result=None) -> TrainingRun:
        self._check_open()
        calls, channel = self._run_methods()
        deadline = None if timeout is None else timeout + config.STOP_GRACE_SECONDS
        call = calls[rpc](request, timeout=deadline, metadata=self._metadata)
        stop_request = pb.StopTrainingRequest(run_id=request.run_id)

        def stop() -> None:
            try:
                calls["StopTraining"](stop_request, timeout=config.STOP_TIMEOUT, metadata=self._metadata)
            except (grpc.RpcError, ValueError):  # ValueError: the client was closed meanwhile
                call.cancel()  # the server cannot be asked: at least free its worker (the fit is lost)

        return TrainingRun(
            call, max_steps=request.max_steps, progress=progress, stop=stop, timeout=timeout,
            on_end=None if channel is None else channel.close, name=name, make_result=make_result,
        )  # fmt: skip

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._core.close()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "ConvClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConvClient({self.targets!r})"
