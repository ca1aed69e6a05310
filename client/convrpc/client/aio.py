"""AsyncConvClient: the asyncio twin of ConvClient; every method is awaited, runs are iterated with ``async for``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc
from grpc import aio

from convrpc.v1 import conv_service_pb2 as pb

from . import config
from .calls import Gather, Sleep, Spawn, Steps, Stream
from .errors import ConvRpcError
from .ops import OpMethods
from .training import TrainingRun, TrainProgress, TrainResult

__all__ = ["AsyncConvClient", "AsyncTrainingRun"]


class AsyncTrainingRun(TrainingRun):
    """A training run for asyncio: ``async for update in run``, ``await run.result()``, ``run.cancel()``."""

    @staticmethod
    def _start_timer(seconds: float, callback) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(seconds, callback)

    async def __aiter__(self) -> AsyncIterator[TrainProgress]:
        bar = self._progress_bar() if self._progress and self._result is None else None
        try:
            while self._result is None and not self._failed:
                try:
                    message = await self._call.read()
                except grpc.RpcError as error:
                    self._end(failed=True)
                    raise ConvRpcError.from_rpc_error(error) from None
                if message is aio.EOF:
                    self._end(failed=True)
                    raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream ended without a result")
                update = self._receive(message, bar)
                if update is not None:
                    yield update
        finally:
            self._leave(bar)  # leaving early (break, task cancelled, Ctrl-C) stops the server's run

    def __iter__(self):
        raise TypeError("an AsyncTrainingRun is iterated with 'async for'")

    async def result(self) -> TrainResult:
        """Await the end of the run and return its result; see :meth:`TrainingRun.result`."""
        async for _ in self:
            pass
        if self._result is None:
            raise ConvRpcError(grpc.StatusCode.INTERNAL, "the training stream failed before its result")
        return self._result


class AsyncConvClient(OpMethods):
    """ConvClient for asyncio: the same constructor and methods, each a coroutine.

    ``train_kernel`` returns an :class:`AsyncTrainingRun` at once (no await).
    """

    _grpc = aio

    def _start(self) -> None:
        # Shared by every call of the client, like the sync client's pool; bound to the loop at first use.
        self._slots = asyncio.Semaphore(config.SHARDS_IN_FLIGHT)
        self._background: set[asyncio.Task] = set()

    async def _run(self, steps, finish):
        self._check_open()
        return finish(await self._drive(steps))

    async def _drive(self, generator):
        """Run one generator of the call core to its end, doing what it yields."""
        steps = Steps(generator)
        with contextlib.closing(generator):
            while (effect := steps.next()) is not None:
                try:
                    steps.reply = await self._do(effect)
                except (grpc.RpcError, ConvRpcError) as exc:  # back into the core, as the sync driver does
                    steps.error = exc
        return steps.value

    async def _slot(self, steps):
        async with self._slots:
            return await self._drive(steps)

    def _forget(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # a health check racing close(): nobody waits for it

    async def _do(self, effect):
        if isinstance(effect, Sleep):
            return await asyncio.sleep(effect.seconds)
        if isinstance(effect, Spawn):
            return self._spawn(self._drive(effect.steps))
        if isinstance(effect, Gather):
            tasks = [asyncio.ensure_future(self._slot(part)) for part in effect.parts]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        method = self._methods[effect.replica.index][effect.method]
        if isinstance(effect, Stream):
            call = method(effect.messages, timeout=effect.timeout, metadata=self._metadata)
            if effect.on_end is not None:
                call.add_done_callback(lambda _: effect.on_end())
            try:
                async for message in call:
                    if effect.blocking:
                        await asyncio.to_thread(effect.receive, message)
                    else:
                        effect.receive(message)
            except BaseException:
                call.cancel()
                raise
            return None
        return await method(effect.request, timeout=effect.timeout, metadata=self._metadata)

    def _train(self, request, progress, timeout, *, rpc="TrainKernel", name="train_kernel", make_result=None) -> AsyncTrainingRun:
        self._check_open()
        calls, channel = self._run_methods()
        deadline = None if timeout is None else timeout + config.STOP_GRACE_SECONDS
        call = calls[rpc](request, timeout=deadline, metadata=self._metadata)
        stop_request = pb.StopTrainingRequest(run_id=request.run_id)

        async def stop() -> None:
            try:
                await calls["StopTraining"](stop_request, timeout=config.STOP_TIMEOUT, metadata=self._metadata)
            except (grpc.RpcError, ValueError):  # ValueError: the client was closed meanwhile
                call.cancel()  # the server cannot be asked: at least free its worker (the fit is lost)

        # cancel() and the end of a run are not coroutines: their calls run as background tasks.
        return AsyncTrainingRun(
            call, max_steps=request.max_steps, progress=progress, stop=lambda: self._spawn(stop()), timeout=timeout,
            on_end=None if channel is None else lambda: self._spawn(channel.close()), name=name,
            make_result=make_result,
        )  # fmt: skip

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._forget)

    async def close(self) -> None:
        self._closed = True
        self._core.close()
        for task in list(self._background):
            task.cancel()
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncConvClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
