"""Server optimizers: what the server does with a round's mean update.

Flower's server strategies ``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi`` and ``FedAdagrad``
(``flwr.serverapp.strategy``, Reddi et al. 2020 "Adaptive Federated Optimization" and Hsu et al.
2019), with Flower's parameter names, defaults and arithmetic, applied to securefed's aggregate::

    new_weights = optimizer.step(weights, mean_update, round)

- ``weights``: the global model as one flat float64 vector, the one the round's clients started from;
- ``mean_update``: the round's released mean of ``trained - weights`` (after DP noise, if any). Flower
  computes ``delta_t = aggregated - current``: the same vector;
- ``round``: the round number, counted from 1 (Flower's ``server_round``). ``FedAdam``'s bias
  correction uses ``round + 1``, as Flower does.

Flower keeps one array per layer; a step here works on the concatenation of those arrays, and every
operation is elementwise, so the result is the same, coordinate by coordinate. The optimizers see
only the aggregate: they work with every protocol and DP setting, and DP accounting is unchanged
(post-processing of released values).

State for a checkpoint, without pickle: ``state_dict()`` returns ``{name: float64 1-D array}``
(empty before the first step, and always for ``FedAvg`` and momentum-free ``FedAvgM``): store it with
``numpy.savez`` or as an ``ArrayRecord``, and give it back to ``load_state_dict`` of an optimizer built
with the same settings. ``describe()`` gives those settings as a JSON-able dict (for the audit log,
and to check on resume that the optimizer did not change).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from securefed.errors import ConfigurationError, InvalidInput

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "ServerOptimizer", "resolve", "step_in_dtype"]


@runtime_checkable
class ServerOptimizer(Protocol):
    """What the Trainer and the Flower strategy need from a server optimizer."""

    def step(self, weights: np.ndarray, mean_update: np.ndarray, round: int) -> np.ndarray:
        """The new global weights (float64, a new array). On an error the state is unchanged."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state arrays, by name (float64, 1-D)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` of an optimizer with the same settings."""
        ...

    def describe(self) -> dict[str, Any]:
        """The optimizer's name and settings, JSON-able."""
        ...


def _real(name: str, value: Any, *, low: float, low_open: bool, high: float | None = None) -> float:
    """`value` as a finite float in its interval; ConfigurationError otherwise (bools are not numbers here)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    x = float(value) if ok else math.nan
    if not (math.isfinite(x) and (x > low if low_open else x >= low) and (high is None or x < high)):
        span = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise ConfigurationError(f"{name} must be a finite number in {span}, got {value!r}")
    return x


def _rate(name: str, value: Any) -> float:
    return _real(name, value, low=0.0, low_open=True)


def _beta(name: str, value: Any) -> float:
    return _real(name, value, low=0.0, low_open=False, high=1.0)


def _vector(name: str, value: Any, *, copy: bool = True) -> np.ndarray:
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):  # a tensor (not a device)
        value = value.detach().cpu()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, bfloat16, junk numpy cannot hold
        raise InvalidInput(f"{name} must be a non-empty 1-D real array (the flat model), got a "
                           f"{type(value).__name__} numpy cannot read as one ({e})") from None
    if arr.dtype.kind not in "fiu" or arr.ndim != 1 or arr.size == 0:
        raise InvalidInput(f"{name} must be a non-empty 1-D real array (the flat model), got dtype {arr.dtype} "
                           f"and shape {arr.shape}")
    out = arr.astype(np.float64, copy=copy)
    if not np.isfinite(out).all():
        raise InvalidInput(f"{name} has NaN or inf entries; give finite values")
    return out


class _Optimizer:
    """Shared checks and state handling; subclasses define ``_STATE`` and ``_compute``."""

    _STATE: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = {}

    def _settings(self) -> dict[str, float]:
        return {}

    def _compute(self, w: np.ndarray, delta: np.ndarray, round: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError

    def step(self, weights: np.ndarray, mean_update: np.ndarray, round: int) -> np.ndarray:
        """New weights from `weights` and the round's `mean_update` (see the module docstring)."""
        if not isinstance(round, numbers.Integral) or isinstance(round, (bool, np.bool_)) or round < 1:
            raise InvalidInput(f"round must be an int >= 1 (Flower's server_round), got {round!r}")
        # Read in place when already float64 (no model-sized copies): _compute only makes new arrays.
        w, delta = _vector("weights", weights, copy=False), _vector("mean_update", mean_update, copy=False)
        if w.shape != delta.shape:
            raise InvalidInput(f"weights has {w.size} coordinates and mean_update {delta.size}; give the same model's")
        if self._state and next(iter(self._state.values())).shape != w.shape:
            raise InvalidInput(f"{type(self).__name__}'s state has {next(iter(self._state.values())).size} "
                               f"coordinates and the model {w.size}: the state is another model's; build a new "
                               "optimizer or load the right state")
        with np.errstate(over="ignore", invalid="ignore"):
            new, state = self._compute(w, delta, int(round))
        if not np.isfinite(new).all() or not all(np.isfinite(v).all() for v in state.values()):
            raise InvalidInput(f"round {round}'s {type(self).__name__} step takes the model to inf or NaN; lower the "
                               "learning rate. The model and the optimizer's state keep their previous values")
        self._state = state  # committed only after the checks: a failed step changes nothing
        return new

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise InvalidInput(f"{name} state must be a mapping of name to array, got {type(state).__name__}")
        if set(state) not in (set(), set(self._STATE)):
            raise InvalidInput(f"{name} state has keys {sorted(state)}; expected none or {list(self._STATE)}: "
                               f"it is not a {name} state with these settings")
        arrays = {k: _vector(f"{name} state {k!r}", state[k]) for k in self._STATE if k in state}
        if len({a.shape for a in arrays.values()}) > 1:
            raise InvalidInput(f"{name} state arrays differ in length: {[a.size for a in arrays.values()]}")
        if "v_t" in arrays and (arrays["v_t"] < 0).any():
            raise InvalidInput(f"{name} state 'v_t' has negative entries; a second moment is >= 0")
        self._state = arrays

    def describe(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, **self._settings()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._settings().items())})"


class FedAvg(_Optimizer):
    """Flower's ``FedAvg``: the new model is the mean of the trained models, ``weights + mean_update``."""

    def _compute(self, w: np.ndarray, delta: np.ndarray, round: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return w + delta, {}


class FedAvgM(_Optimizer):
    """Flower's ``FedAvgM`` (server SGD with momentum, PyTorch's convention, no dampening or Nesterov).

    ``server_learning_rate`` > 0 (default 1.0), ``server_momentum`` in [0, 1) (default 0.0). Flower's
    pseudo-gradient is ``-mean_update``; the momentum buffer starts as the first pseudo-gradient and
    is kept (state ``momentum_vector``) only when ``server_momentum > 0``.
    """

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        self.server_learning_rate = _rate("server_learning_rate", server_learning_rate)
        self.server_momentum = _beta("server_momentum", server_momentum)
        self._STATE = ("momentum_vector",) if self.server_momentum > 0.0 else ()

    def _settings(self) -> dict[str, float]:
        return {"server_learning_rate": self.server_learning_rate, "server_momentum": self.server_momentum}

    def _compute(self, w: np.ndarray, delta: np.ndarray, round: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self.server_momentum == 0.0 and self.server_learning_rate == 1.0:
            return w + delta, {}  # Flower: server_opt is off, the aggregate is the model
        pseudo_gradient = -delta  # Flower's old - new: the same floats, negation is exact
        state: dict[str, np.ndarray] = {}
        if self.server_momentum > 0.0:
            mv = self._state.get("momentum_vector")
            pseudo_gradient = pseudo_gradient if mv is None else self.server_momentum * mv + pseudo_gradient
            state["momentum_vector"] = pseudo_gradient
        return w - self.server_learning_rate * pseudo_gradient, state


class _FedOpt(_Optimizer):
    """Flower's ``FedOpt`` base: first moment ``m_t``, then a subclass's second moment ``v_t``."""

    _STATE = ("m_t", "v_t")

    def __init__(self, *, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta = _rate("eta", eta)
        self.beta_1 = _beta("beta_1", beta_1)
        self.beta_2 = _beta("beta_2", beta_2)
        self.tau = _rate("tau", tau)

    def _settings(self) -> dict[str, float]:
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}

    def _v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _eta(self, round: int) -> float:
        return self.eta

    def _compute(self, w: np.ndarray, delta: np.ndarray, round: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # Same expressions, in the same order, as flwr's FedOpt._compute_deltat_and_mt and the subclasses.
        m = self._state.get("m_t", np.zeros_like(delta))
        v = self._state.get("v_t", np.zeros_like(delta))
        m_t = self.beta_1 * m + (1 - self.beta_1) * delta
        v_t = self._v(v, delta)
        return w + self._eta(round) * m_t / (np.sqrt(v_t) + self.tau), {"m_t": m_t, "v_t": v_t}


class FedAdam(_FedOpt):
    """Flower's ``FedAdam``: ``eta`` 0.1, ``beta_1`` 0.9, ``beta_2`` 0.99, ``tau`` 1e-3 by default.

    Bias correction as Flower: ``eta * sqrt(1 - beta_2**(round + 1)) / (1 - beta_1**(round + 1))``.
    """

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * (delta**2)

    def _eta(self, round: int) -> float:
        return float(self.eta * np.sqrt(1 - np.power(self.beta_2, round + 1.0))
                     / (1 - np.power(self.beta_1, round + 1.0)))


class FedYogi(_FedOpt):
    """Flower's ``FedYogi``: ``eta`` 1e-2, ``beta_1`` 0.9, ``beta_2`` 0.99, ``tau`` 1e-3 by default (no bias
    correction; ``v_t`` starts at 0)."""

    def __init__(self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * (delta**2) * np.sign(v - delta**2)


class FedAdagrad(_FedOpt):
    """Flower's ``FedAdagrad``: ``eta`` 0.1, ``tau`` 1e-3 by default (Flower fixes ``beta_1 = beta_2 = 0``)."""

    def __init__(self, *, eta: float = 1e-1, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=0.0, beta_2=0.0, tau=tau)

    def _settings(self) -> dict[str, float]:
        return {"eta": self.eta, "tau": self.tau}

    def _v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + (delta**2)


def resolve(server_optimizer: ServerOptimizer | None, server_lr: float = 1.0) -> ServerOptimizer:
    """The optimizer a run uses: `server_optimizer`, or for None the ``server_lr`` shorthand.

    ``server_lr=x`` is ``FedAvgM(server_learning_rate=x)``: ``weights + x * mean_update``, plain FedAvg
    at 1.0. Giving both with ``server_lr != 1.0`` is a ConfigurationError (one of them would be ignored).
    """
    lr = _rate("server_lr", server_lr)
    if server_optimizer is None:
        return FedAvg() if lr == 1.0 else FedAvgM(server_learning_rate=lr)
    if not isinstance(server_optimizer, ServerOptimizer):
        raise ConfigurationError(f"server_optimizer must be an object from securefed.optim (FedAvg, FedAvgM, "
                                 f"FedAdam, FedYogi, FedAdagrad), got {type(server_optimizer).__name__}")
    if lr != 1.0:
        raise ConfigurationError(f"give server_lr ({server_lr!r}) or server_optimizer, not both; for a server "
                                 "learning rate with an optimizer use its own (FedAvgM's server_learning_rate, "
                                 "the FedOpt family's eta)")
    return server_optimizer


def step_in_dtype(optimizer: ServerOptimizer, weights: np.ndarray, mean_update: np.ndarray, round: int
                  ) -> tuple[np.ndarray, ServerOptimizer]:
    """One server step for a model held in ``weights.dtype`` (float32, most often): ``(new weights in that dtype,
    the stepped optimizer)``.

    The optimizer steps in float64 on a shallow copy of `optimizer`, which is left as it was: keep the
    returned one. securefed's optimizers replace their state arrays on a step and never write into
    them, so the copy costs nothing and a failed step changes no state. InvalidInput when the new
    weights are not finite in ``weights.dtype`` (a float32 model overflows long before float64).
    """
    weights = np.asarray(weights)
    trial = copy.copy(optimizer)
    new = trial.step(weights, mean_update, round)  # step reads it as float64: one copy, not two
    with np.errstate(over="ignore", invalid="ignore"):
        cast = new.astype(weights.dtype)
    if not np.isfinite(cast).all():
        raise InvalidInput(f"round {round}'s update takes the model's {weights.dtype} parameters to inf or NaN (server "
                           f"step {optimizer!r}); lower server_lr (or the optimizer's learning rate) or lr. The model "
                           "and the optimizer's state keep their previous values")
    return cast, trial
