"""The SDK's network methods, shared by the sync and asyncio clients: ``forward``, ``backward`` and ``train``.

A network call is a Forward or Backward whose computation is a ``Network`` instead of an ``Op``, so it
goes through the same call core (``calls.CallCore``) as the op methods: every data path, sharding
along N (parameter gradients summed over the shards), failover. Training streams TrainNetwork into
the same ``TrainingRun`` as ``train_kernel``, with StopTraining to keep the parameters reached.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from convrpc import networks, wire
from convrpc.core.network import NetworkGradients, Sequential
from convrpc.v1 import conv_service_pb2 as pb

from .messages import Call
from .tensors import as_array, checked_network, from_tensor
from .training import History, TrainingRun, check_timeout, plot_loss, run_fields

__all__ = ["NetworkMethods", "NetworkTrainResult"]


@dataclass(frozen=True, repr=False)
class NetworkTrainResult:
    """The outcome of a network's training run.

    Attributes
    ----------
    params : list of dict
        The fitted parameters, one dict per layer (``{"weight", "bias"}``, ``{}`` for a layer
        without parameters), in torch's layouts and the input's dtype.
    loss : float
        The loss of exactly these parameters on the whole data set.
    steps : int
        Optimizer updates run.
    stop_reason : str
        ``"converged"``, ``"max_steps"``, ``"cancelled"``, ``"diverged"`` or ``"time_limit"``, as
        for ``train_kernel``.
    history : History
        The whole loss curve, ``steps + 1`` points, the last equal to ``loss``; ``accuracy`` at
        the steps a progress update reported (cross_entropy).
    elapsed : float
        Seconds the run took on the server.
    accuracy : float or None
        With ``loss="cross_entropy"``, the share of the data these parameters classify right.
    """

    params: list
    loss: float
    steps: int
    stop_reason: str
    history: History
    elapsed: float = 0.0
    accuracy: float | None = None

    def __repr__(self) -> str:
        accuracy = "" if self.accuracy is None else f", accuracy={self.accuracy:.4g}"
        return (
            f"NetworkTrainResult(stop_reason={self.stop_reason!r}, steps={self.steps}, loss={self.loss:.4g}"
            f"{accuracy}, params=<{sum(len(p) for p in self.params)} arrays>, elapsed={self.elapsed:.3g}s)"
        )

    def plot(self, ax=None, *, title: str | None = None):
        """Draw the loss curve (log scale) with matplotlib and return the axes."""
        return plot_loss(self, ax, title=title)


def _network_result(layers: int):
    def make(msg: pb.TrainNetworkResult, history: History) -> NetworkTrainResult:
        arrays = {f: from_tensor(t) for f, t in wire.tensor_fields(msg) if f.startswith("params[")}
        return NetworkTrainResult(
            params=networks.params_of(arrays, layers),
            loss=msg.loss,
            steps=msg.steps,
            stop_reason=wire.STOP_REASON_NAMES.get(msg.stop_reason, "unknown"),
            history=history,
            elapsed=msg.elapsed_seconds,
            accuracy=msg.accuracy if msg.HasField("accuracy") else None,
        )

    return make


def _param_arrays(params) -> object:
    """A params list with every entry's arrays as the wire carries them; anything else as it is, for the
    core's check to refuse by name."""
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, Mapping) for p in params):
        return params
    return [{k: as_array(v, f"params[{i}].{k}") for k, v in entry.items()} for i, entry in enumerate(params)]


class NetworkMethods:
    """``forward``, ``backward`` and ``train`` of a :class:`~convrpc.client.nn.Sequential`, each one call to
    one server that runs the whole chain; mixed into the op methods of both clients."""

    def _network_call(self, net, backward: bool, input, params, grad_output, timeout, finish):
        x = as_array(input, "input")
        gy = None if grad_output is None else as_array(grad_output, "grad_output")
        params = _param_arrays([] if params is None else params)  # none: refused as 0 entries, after the chain
        message = checked_network(net, x, params, gy)
        arrays = {"grad_output": gy, "input": x} if backward else {"input": x}
        call = Call("network", message, backward, {**arrays, **networks.param_arrays(params)}, self._deadline(timeout), net)
        return self._run(self._core.call(call), finish)

    def forward(self, net: Sequential, input: ArrayLike, params: Sequence[dict], *, timeout: float | None = None) -> np.ndarray:
        """The output of network ``net`` for ``input``: the whole chain computed on the server in one call.

        Parameters
        ----------
        net : Sequential
            The layers (``convrpc.client.nn``), named and argued like torch.nn.
        input : array_like, (N, C, H, W) or (N, features), float16, bfloat16, float32 or float64
        params : list of dict
            One dict per layer (``{"weight": w, "bias": b}``, no "bias" when ``bias=False``, ``{}`` for
            a layer without parameters), in torch's layouts and the input's dtype; ``net.init(seed)``
            makes fresh ones.
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        numpy.ndarray, the network's output, in the input's dtype

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the field (``network.layers[3].in_channels``, ``params[2].weight``,
            ``input``) for a chain, input or parameter that does not fit, raised before anything is
            sent; RESOURCE_EXHAUSTED past the server's caps (naming the layer); UNAVAILABLE when no
            replica answers; DEADLINE_EXCEEDED after ``timeout``.
        """
        return self._network_call(net, False, input, params, None, timeout, lambda results: results["output"])

    def backward(
        self, net: Sequential, input: ArrayLike, params: Sequence[dict], grad_output: ArrayLike, *,
        timeout: float | None = None,
    ) -> NetworkGradients:  # fmt: skip
        """Gradients of a loss w.r.t. the input and every parameter of ``net``, given ``grad_output``, its
        gradient w.r.t. the network's output: the forward and backward chain on the server in one call.

        Parameters
        ----------
        net, input, params
            As for :meth:`forward`.
        grad_output : array_like, shaped like the network's output, the input's dtype
        timeout : float, optional
            Deadline in seconds (default: the client's ``timeout``).

        Returns
        -------
        NetworkGradients
            ``NetworkGradients(input, params)``: the gradient w.r.t. the input, and a list shaped like
            ``params`` of the parameters' gradients.

        Raises
        ------
        ConvRpcError
            As for :meth:`forward`; also INVALID_ARGUMENT naming ``grad_output`` for a wrong shape.
        """
        layers = len(net) if isinstance(net, Sequential) else 0

        def finish(results: dict) -> NetworkGradients:
            return NetworkGradients(results["grad_input"], networks.params_of(results, layers, "grad_params"))

        return self._network_call(net, True, input, params, grad_output, timeout, finish)

    def train(
        self, net: Sequential, input: ArrayLike, target: ArrayLike, *, params: Sequence[dict] | None = None,
        seed: int | None = None, loss: str = "mse", optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.0,
        max_steps: int = 1000, tol: float = 0.0, batch_size: int | None = None, report_every: int = 1,
        max_seconds: float | None = None, progress: bool = False, nesterov: bool = False, weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, timeout: float | None = None,
    ) -> TrainingRun:  # fmt: skip
        """Fit every parameter of ``net`` on the server so that its output approaches ``target`` (or classifies
        it, with ``loss="cross_entropy"``).

        Returns at once with a live run, as :meth:`train_kernel` does: iterate it for progress updates
        (``.step``, ``.loss``, ``.elapsed``, ``.accuracy``), call ``.result()`` for the
        :class:`NetworkTrainResult`, ``.cancel()`` to stop it. The whole run happens on one server.

        Parameters
        ----------
        net : Sequential
        input : array_like, (N, C, H, W) or (N, features), float32 or float64
        target : array_like
            Shaped like the network's output, in the input's dtype; with ``loss="cross_entropy"``,
            int64 class indices (N,) against the output's logits (N, classes).
        params : list of dict, optional
            The starting parameters (as for :meth:`forward`); None: drawn on the server like torch's
            ``reset_parameters`` from ``seed``, the same as ``net.init(seed)``.
        seed : int in [0, 2**64), optional
            Seeds the initial parameters and the mini-batch shuffling.
        loss : {"mse", "half_mse", "half_sse", "cross_entropy"}, default "mse"
            The first three as for ``train_kernel``; cross_entropy as ``F.cross_entropy`` (mean).
        optimizer, lr, momentum, nesterov, weight_decay, betas, eps
            torch.optim.SGD's or Adam's rules over every parameter, as for ``train_kernel``.
        max_steps : int, default 1000
        tol : float, default 0.0
            Stop as "converged" once the whole data's loss is <= tol.
        batch_size : int, optional
            Samples per step (None: the whole batch), shuffled per epoch from ``seed``.
        report_every : int, default 1
            A progress update every this many steps (the server also sends at most one per 50 ms).
        max_seconds : float, optional
            Stop as "time_limit" after this long (None: the server's cap).
        progress : bool, default False
            Show a tqdm bar (loss and, for cross_entropy, accuracy) while the run is consumed.
        timeout : float, optional
            Stop the run this many seconds after it started, keeping what it reached.

        Returns
        -------
        TrainingRun
            ``.result()`` returns a :class:`NetworkTrainResult` (params, loss, steps, stop_reason,
            history, accuracy). ``.cancel()``, leaving its loop early and Ctrl-C stop the run on the
            server without losing it: ``.result()`` then returns the parameters of the last step.

        Raises
        ------
        ConvRpcError
            INVALID_ARGUMENT naming the argument or field (``network.layers[3].in_channels``,
            ``params[2].weight``, ``lr``) before anything is sent; the server's refusals (target,
            caps) when the run is consumed.
        """
        check_timeout(timeout)
        fields = run_fields(
            losses=wire.LOSSES, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, betas=betas, eps=eps, loss=loss, max_steps=max_steps, tol=tol,
            report_every=report_every, seed=seed, batch_size=batch_size, max_seconds=max_seconds,
        )  # fmt: skip
        x, y = as_array(input, "input"), as_array(target, "target")
        params = None if params is None else _param_arrays(params)
        request = pb.TrainNetworkRequest(
            network=checked_network(net, x, params), input=wire.encode_tensor(x), target=wire.encode_tensor(y),
            **fields,
        )  # fmt: skip
        if params is not None:
            tensors = {f: wire.encode_tensor(a, f) for f, a in networks.param_arrays(params).items()}
            wire.fill_tensors(request, tensors, len(net))
        request.run_id = secrets.token_hex(16)  # 128 random bits: only this client can stop the run
        return self._train(request, progress, timeout, rpc="TrainNetwork", name="train", make_result=_network_result(len(net)))
