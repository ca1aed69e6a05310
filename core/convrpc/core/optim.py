"""SGD and Adam with torch.optim's update rules, on arrays of any backend's array module.

Each ``*Options`` dataclass mirrors the proto message of the same name field for field and
validates itself; ``options.build(xp)`` returns the optimizer, whose ``step(params, grads)``
returns NEW parameter arrays and never writes into the ones it was given (the training loop
keeps the previous weights to fall back on when a step diverges). The L2 penalty
``weight_decay`` is added to the gradient of every parameter, the bias included, as torch does
for a single parameter group; it is not AdamW's decoupled decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidArgumentError

__all__ = ["SgdOptions", "AdamOptions", "Sgd", "Adam"]


def _check_real(value, field: str, *, low: float, low_open: bool = False, high: float | None = None) -> float:
    """``value`` as a float in [low, high) (or (low, high) with ``low_open``), or InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise InvalidArgumentError(field, f"expected a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high})" if high is not None else "inf)"
        raise InvalidArgumentError(field, f"must be a finite number in {lo}, {hi}, got {value!r}")
    return v


@dataclass(frozen=True)
class SgdOptions:
    """torch.optim.SGD with dampening 0: the proto's ``SgdOptions``."""

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def validate(self) -> None:
        _check_real(self.lr, "lr", low=0.0, low_open=True)
        _check_real(self.momentum, "momentum", low=0.0)
        _check_real(self.weight_decay, "weight_decay", low=0.0)
        if not isinstance(self.nesterov, bool):
            raise InvalidArgumentError("nesterov", f"expected a bool, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise InvalidArgumentError("nesterov", "Nesterov momentum needs momentum > 0")

    def build(self, xp) -> "Sgd":
        """A fresh optimizer working with array module ``xp`` (NumPy or CuPy)."""
        self.validate()
        return Sgd(self, xp)


@dataclass(frozen=True)
class AdamOptions:
    """torch.optim.Adam (amsgrad off, L2 penalty in the gradient): the proto's ``AdamOptions``."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        _check_real(self.lr, "lr", low=0.0, low_open=True)
        _check_real(self.beta1, "beta1", low=0.0, high=1.0)
        _check_real(self.beta2, "beta2", low=0.0, high=1.0)
        _check_real(self.eps, "eps", low=0.0)
        _check_real(self.weight_decay, "weight_decay", low=0.0)

    def build(self, xp) -> "Adam":
        """A fresh optimizer working with array module ``xp`` (NumPy or CuPy)."""
        self.validate()
        return Adam(self, xp)


class Sgd:
    """g = grad + wd*p; buf = g at the first step, then momentum*buf + g;
    d = g + momentum*buf (Nesterov) or buf (momentum) or g (plain); p <- p - lr*d."""

    def __init__(self, options: SgdOptions, xp):
        self.options = options
        self.xp = xp
        self._buffers = None

    def step(self, params: list, grads: list) -> list:
        o = self.options
        if o.weight_decay:
            grads = [g + o.weight_decay * p for p, g in zip(params, grads)]
        if o.momentum:
            if self._buffers is None:
                self._buffers = [g.copy() for g in grads]
            else:
                self._buffers = [o.momentum * buf + g for buf, g in zip(self._buffers, grads)]
            if o.nesterov:
                grads = [g + o.momentum * buf for g, buf in zip(grads, self._buffers)]
            else:
                grads = self._buffers
        return [p - o.lr * d for p, d in zip(params, grads)]


class Adam:
    """t += 1; g = grad + wd*p; m <- m + (1-b1)(g-m); v <- b2*v + (1-b2)g^2;
    p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)  (torch's order of operations)."""

    def __init__(self, options: AdamOptions, xp):
        self.options = options
        self.xp = xp
        self._t = 0
        self._m = None
        self._v = None

    def step(self, params: list, grads: list) -> list:
        o = self.options
        if o.weight_decay:
            grads = [g + o.weight_decay * p for p, g in zip(params, grads)]
        if self._m is None:
            self._m = [self.xp.zeros_like(g) for g in grads]
            self._v = [self.xp.zeros_like(g) for g in grads]
        self._t += 1
        # torch updates m with lerp and its two branches; matching them keeps trajectories equal
        # to rounding, so the parity test can be tight.
        w = 1 - o.beta1
        if w < 0.5:
            self._m = [m + w * (g - m) for m, g in zip(self._m, grads)]
        else:
            self._m = [g - (g - m) * (1 - w) for m, g in zip(self._m, grads)]
        self._v = [o.beta2 * v + (1 - o.beta2) * (g * g) for v, g in zip(self._v, grads)]
        step_size = o.lr / (1 - o.beta1**self._t)
        root_bc2 = (1 - o.beta2**self._t) ** 0.5
        sqrt = self.xp.sqrt
        return [p - step_size * (m / (sqrt(v) / root_bc2 + o.eps)) for p, m, v in zip(params, self._m, self._v)]
