"""Privacy configurations for :class:`~securefed.training.Trainer` (``privacy=``).

- :class:`CentralDP`: client-level DP-FedAvg; the server adds Gaussian noise to the
  decoded sum (trusted server). Works with every protocol.
- :class:`DistributedDP`: client-level, the noise added by the clients in the integer
  domain inside secure aggregation (discrete Gaussian or Skellam); needs a protocol
  that carries integer encodings (SecAgg, SecAgg+), provisioned for its threshold.
- :class:`SampleLevelDP`: DP-SGD in each participant's local training; the unit is one
  example.

Each takes an optional budget ``target_epsilon`` at ``delta``: the trainer raises
PrivacyBudgetExceeded before a round that would exceed it. Each implements
:class:`~securefed.privacy.mechanisms.Privacy`: :meth:`session_mechanism` builds the
per-round mechanism the trainer's session delegates to (``mechanisms.CentralMechanism``,
``DistributedMechanism``, ``SampleLevelMechanism``). See ``protocols/dp.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy.client_level import ClientShares, ServerNoise
from securefed.privacy.clipping import Clipping, FlatClipping
from securefed.privacy.mechanisms import CentralMechanism, DistributedMechanism, SampleLevelMechanism

__all__ = ["CentralDP", "DistributedDP", "PrivacyConfig", "SampleLevelDP"]


def _positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Budget and accounting common to every configuration."""

    noise_multiplier: float
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ConfigurationError(f"delta must be in (0, 1), got {self.delta!r}")
        if not isinstance(self.accountant, str) or self.accountant not in ("rdp", "pld"):
            raise ConfigurationError(f"accountant must be 'rdp' or 'pld', got {self.accountant!r}")


def _fraction(name: str, v: object, *, zero: bool) -> None:
    """`v` a number in [0, 1) (`zero`) or (0, 1); bools and NaN refused."""
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and (v >= 0 if zero else v > 0) and v < 1)
    if not ok:
        raise ConfigurationError(f"{name} must be a number in {'[' if zero else '('}0, 1), got {v!r}")


def _clipping(value: Clipping | float) -> Clipping:
    if isinstance(value, Clipping):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return FlatClipping(l2_clip=value)
    raise ConfigurationError(f"clipping must be a Clipping module or an L2 norm, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CentralDP(PrivacyConfig):
    """Client-level DP with server-side Gaussian noise of std ``noise_multiplier * clip`` per coordinate.

    ``clipping``: a :class:`~securefed.privacy.clipping.Clipping` module or an L2 norm
    (flat clipping). With :class:`~securefed.privacy.clipping.AdaptiveClipping`,
    ``noise_multiplier`` is the overall multiplier, split between update and count.
    """

    clipping: Clipping | float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _clipping(self.clipping)

    def client_noise(self) -> ServerNoise:
        """Where the noise enters: the server adds it to the decoded sum."""
        return ServerNoise()

    def session_mechanism(
        self, *, protocol: Any, population: int, clients_per_round: int, dimension: int, local_steps: int,
        rng: RandomSource,
    ) -> CentralMechanism:
        """The trainer's per-round mechanism: Poisson sampling, clipping, the server's Gaussian noise."""
        return CentralMechanism(self, protocol=protocol, population=population, clients_per_round=clients_per_round,
                                dimension=dimension, rng=rng)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedDP(PrivacyConfig):
    """Client-level DP with integer noise added by each client inside secure aggregation.

    ``mechanism``: ``"ddg"`` (distributed discrete Gaussian) or ``"skellam"``; the total
    noise of the t = ``protocol.min_survivors(n)`` shares a finished round is sure to
    include has std ``noise_multiplier * clip``. ``granularity``: the rounding step
    (default clip / (100 sqrt(d)), 1% sensitivity overhead); ``beta``: conditional
    rounding; ``rotation``: randomized Hadamard; ``wrap_probability``: bound on the
    chance that some coordinate of a round's sum wraps around the modulus;
    ``colluding_fraction``: clients (ceil of this fraction of the round) that may pool
    their noise with the server (e.g. the protocol's corrupt_fraction); noise is then
    provisioned for the t - C honest shares and only honest shares are counted.
    Default 0: the clients do not collude with the server.
    """

    clipping: Clipping | float = 1.0
    mechanism: Literal["ddg", "skellam"] = "ddg"
    granularity: float | None = None
    beta: float = 0.0
    rotation: bool = True
    wrap_probability: float = 1e-9
    colluding_fraction: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _clipping(self.clipping)
        if not isinstance(self.mechanism, str) or self.mechanism not in ("ddg", "skellam"):
            raise ConfigurationError(f"mechanism must be 'ddg' or 'skellam', got {self.mechanism!r}")
        if self.accountant != "rdp":
            raise ConfigurationError("the distributed mechanisms are accounted with accountant='rdp' only")
        if self.granularity is not None:
            _positive("granularity", self.granularity)
        _fraction("beta", self.beta, zero=True)
        _fraction("wrap_probability", self.wrap_probability, zero=False)
        if not isinstance(self.rotation, bool):
            raise ConfigurationError(f"rotation must be True or False, got {self.rotation!r}")
        f = self.colluding_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigurationError(f"colluding_fraction must be in [0, 1), got {f!r}")

    def client_noise(self) -> ClientShares:
        """Where the noise enters: each client's integer share inside the protocol's encoding."""
        return ClientShares(self)

    def session_mechanism(
        self, *, protocol: Any, population: int, clients_per_round: int, dimension: int, local_steps: int,
        rng: RandomSource,
    ) -> DistributedMechanism:
        """The trainer's per-round mechanism: Poisson sampling, clipping, the clients' noise in `protocol`'s
        encoder (ConfigurationError for a protocol without integer encodings or a threshold colluders fill)."""
        return DistributedMechanism(self, protocol=protocol, population=population,
                                    clients_per_round=clients_per_round, dimension=dimension, rng=rng)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleLevelDP(PrivacyConfig):
    """DP-SGD in local training: per-example clipping to ``max_grad_norm``, Gaussian noise, Poisson
    sampling of each participant's examples at ``sampling_rate`` per step."""

    max_grad_norm: float = 1.0
    sampling_rate: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("max_grad_norm", self.max_grad_norm)
        r = self.sampling_rate
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0 < r <= 1):
            raise ConfigurationError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")

    def session_mechanism(
        self, *, protocol: Any, population: int, clients_per_round: int, dimension: int, local_steps: int,
        rng: RandomSource,
    ) -> SampleLevelMechanism:
        """The trainer's per-round mechanism: DP-SGD in each participant's `local_steps` epochs (loads torch)."""
        return SampleLevelMechanism(self, dimension=dimension, local_steps=local_steps)
