"""The per-round mechanisms a :class:`~securefed.privacy.session.PrivacySession` delegates to.

A privacy configuration is anything that implements :class:`Privacy`: its budget settings and
:meth:`Privacy.session_mechanism`, which builds the :class:`RoundMechanism` of one trainer's
session. The library's three:

- :class:`CentralMechanism` (``CentralDP``): Poisson sampling of participants, clipping, Gaussian
  noise added by the server to the decoded sum;
- :class:`DistributedMechanism` (``DistributedDP``): the same sampling and clipping, the noise
  added by each client as an integer share in the protocol's encoder;
- :class:`SampleLevelMechanism` (``SampleLevelDP``): DP-SGD in each participant's local training.

The two client-level mechanisms compose a clip part: :class:`FixedClip` (flat or per-layer) or
:class:`AdaptiveClip` (the clip follows a quantile through a noised count bit each participant
appends). Their noise provisioning and accounting are those of
:class:`~securefed.privacy.client_level.ClientLevelMechanism`, which the Flower side uses too.
See ``protocols/dp.md`` ("Typed configurations", section 2) and ``proofs/dp.md`` Claim 1.3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy.accountant import AccountantKind
from securefed.privacy.client_level import ClientLevelMechanism, clipping_module
from securefed.privacy.clipping import AdaptiveClipping, Clipping
from securefed.privacy.events import PrivacyEvent
from securefed.privacy.noise import CentralGaussian

if TYPE_CHECKING:
    from securefed.privacy.config import CentralDP, DistributedDP, SampleLevelDP
    from securefed.privacy.dpsgd import DPSGD  # torch: loaded only for sample-level DP

__all__ = [
    "AdaptiveClip",
    "CentralMechanism",
    "DistributedMechanism",
    "FixedClip",
    "Privacy",
    "RoundMechanism",
    "SampleLevelMechanism",
    "count_bit_input",
]


class RoundMechanism(Protocol):
    """What a session needs of its privacy mechanism, round by round.

    Attributes: ``client_level`` (the unit is a participant; False: one example),
    ``sampling_rate`` (Poisson rate of participants; 1.0: the trainer's fixed cohorts),
    ``local_training`` (participants train with :meth:`train_locally`), ``dimension`` (length
    of :meth:`client_input`'s vector for the model), ``clipping`` (the clipping module clients
    apply, None when local training makes the update private), ``dpsgd`` (sample level's DP-SGD).
    Optional: ``guards_against_server`` (True: the guarantee is claimed against the server, which draws
    the Poisson sample, so the session warns that the unamplified epsilon is the one that holds;
    ``protocols/dp.md`` section 1), False when absent.
    """

    client_level: bool
    sampling_rate: float
    local_training: bool
    dimension: int
    clipping: Clipping | None
    dpsgd: DPSGD | None

    def runnable(self, n: int) -> bool:
        """Whether n >= 1 sampled participants can make a round (False: skip it, at no privacy cost)."""
        ...

    def start_round(self, round: int) -> None:
        """Fix the round's parameters (an adaptive clip's bound) before its budget check."""
        ...

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        """An event costing at least what a round of n participants can cost, whoever survives."""
        ...

    def event(self, *, included: int, n: int, round: int) -> PrivacyEvent:
        """The event of a round of n whose aggregate holds `included` participants' inputs."""
        ...

    def input_size(self, dimension: int) -> int:
        """The length of :meth:`client_input`'s vector for an update of `dimension` coordinates."""
        ...

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        """What a participant sends for its model update (clipped, with whatever the mechanism appends)."""
        ...

    def round_protocol(self, base: Any, round: int) -> Any:
        """The aggregation protocol of the round (`base`, or `base` carrying the round's noise encoder)."""
        ...

    def finish(self, total: np.ndarray, *, included: int, round: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """From the round's float64 sum (which it may change in place): the released sum (what an audit
        log may hash), the sum of the model updates, and the round's metrics."""
        ...

    def train_locally(self, model: Any, dataset: Any, loss_fn: Any, optimizer: Any, rng: RandomSource) -> float:
        """Local training that makes the update private (``local_training``); returns the mean loss."""
        ...

    def mechanism(self) -> ClientLevelMechanism:
        """The round's client-level noise and accounting (ConfigurationError where there is none)."""
        ...

    def audit_settings(self) -> dict[str, Any]:
        """The accounting an audit log declares: ``{"accountant": ..., "delta": ...}``."""
        ...


class Privacy(Protocol):
    """A privacy configuration: the budget, and the mechanism it builds for a session.

    ``CentralDP``, ``DistributedDP`` and ``SampleLevelDP`` implement it; so may a user's own class.
    The session calls :meth:`session_mechanism` once and checks the budget before each round.
    """

    @property
    def target_epsilon(self) -> float | None: ...

    @property
    def delta(self) -> float: ...

    @property
    def accountant(self) -> AccountantKind: ...

    def session_mechanism(
        self, *, protocol: Any, population: int, clients_per_round: int, dimension: int, local_steps: int,
        rng: RandomSource,
    ) -> RoundMechanism:
        """The mechanism of one session of `population` participants, `clients_per_round` of them per round
        (client level: Poisson rate clients_per_round / population), on model updates of `dimension`
        coordinates, `local_steps` local epochs; `rng` is the session's secret randomness."""
        ...


def count_bit_input(clipping: AdaptiveClipping, count_scale: float, update: np.ndarray,
                    layout: Sequence[int]) -> np.ndarray:
    """The clipped update with the scaled count bit s (b - 1/2) appended, b = [||update|| <= clip]."""
    x = clipping.clip(update, layout)
    bit = 1.0 if clipping.unclipped(update) else 0.0
    return np.append(x, count_scale * (bit - 0.5))


class FixedClip:
    """A clip that does not move: the update is clipped and sent as it is."""

    def __init__(self, clipping: Clipping) -> None:
        self.clipping = clipping
        self.bound = clipping.bound

    def start_round(self) -> None:
        self.bound = self.clipping.bound

    def input_size(self, dimension: int) -> int:
        return dimension

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        return self.clipping.clip(update, layout)

    def finish(self, total: np.ndarray, included: int, metrics: dict[str, float]) -> np.ndarray:
        return total


class AdaptiveClip:
    """Adaptive clipping's part of a round (Andrew et al. 2021): the count bit and the clip's update.

    The count bit b - 1/2, scaled by s = C z_update / sigma_count, gets the update's noise std
    z_update C; the pair (update, s (b - 1/2)) has norm <= C z_update / z, the round's joint bound.
    """

    def __init__(self, clipping: AdaptiveClipping, *, noise_multiplier: float, expected: float) -> None:
        self.clipping = clipping
        self.count_stddev = clipping.count_stddev or 0.05 * expected
        self.update_multiplier = clipping.update_noise_multiplier(noise_multiplier, self.count_stddev)
        self.start_round()

    def start_round(self) -> None:
        c = self.clipping.bound
        self.count_scale = c * self.update_multiplier / self.count_stddev
        self.bound = math.sqrt(c * c + (self.count_scale / 2.0) ** 2) * (1.0 + 1e-12)

    def input_size(self, dimension: int) -> int:
        return dimension + 1

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        return count_bit_input(self.clipping, self.count_scale, update, layout)

    def finish(self, total: np.ndarray, included: int, metrics: dict[str, float]) -> np.ndarray:
        """Move the clip by the noised unclipped fraction; returns the sum without the count."""
        fraction = (total[-1] / self.count_scale + included / 2.0) / included
        self.clipping.observe(fraction)
        metrics["unclipped_fraction"] = fraction
        return total[:-1]


class _ClientLevel:
    """Client level: Poisson sampling at clients_per_round / population, clipping, one noised sum a round."""

    client_level = True
    local_training = False
    dpsgd: DPSGD | None = None

    def __init__(self, config: CentralDP | DistributedDP, *, protocol: Any, population: int,
                 clients_per_round: int, dimension: int, rng: RandomSource) -> None:
        self.config = config
        self.sampling_rate = clients_per_round / population
        clipping = copy.deepcopy(clipping_module(config))  # the adaptive clip's state is the session's own
        self.clipping: Clipping | None = clipping
        if isinstance(clipping, AdaptiveClipping):
            expected = max(1.0, self.sampling_rate * population)
            self.clip: FixedClip | AdaptiveClip = AdaptiveClip(clipping, noise_multiplier=config.noise_multiplier,
                                                               expected=expected)
        else:
            self.clip = FixedClip(clipping)
        self.dimension = self.clip.input_size(dimension)
        self._protocol = protocol
        self._rng = rng

    @property
    def count_stddev(self) -> float | None:
        """The adaptive clip's count noise std in force (its configured one, else 0.05 x the expected
        participants); None for a fixed clip."""
        return self.clip.count_stddev if isinstance(self.clip, AdaptiveClip) else None

    def mechanism(self) -> ClientLevelMechanism:
        """The round's noise, events and planned event (what Flower's strategy uses too)."""
        return ClientLevelMechanism(self.config, protocol=self._protocol, dimension=self.dimension,
                                    l2_bound=self.clip.bound, sampling_rate=self.sampling_rate)

    def runnable(self, n: int) -> bool:
        """Poisson samples smaller than the protocol accepts, or than distributed noise needs, are skipped."""
        if self.sampling_rate >= 1.0:
            return True  # fixed cohorts: a protocol that cannot run them is a configuration error
        try:
            self.mechanism().honest_survivors(n)
        except ConfigurationError:
            return False
        return True

    def start_round(self, round: int) -> None:
        self.clip.start_round()

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        return self.mechanism().planned_event(round, n)

    def event(self, *, included: int, n: int, round: int) -> PrivacyEvent:
        return self.mechanism().event(included=included, n=n, round=round)

    def input_size(self, dimension: int) -> int:
        return self.clip.input_size(dimension)

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        return self.clip.client_input(update, layout)

    def round_protocol(self, base: Any, round: int) -> Any:
        return base

    def _noise(self, total: np.ndarray, round: int) -> None:
        """Central noise goes in here; distributed noise is already in the sum."""

    def finish(self, total: np.ndarray, *, included: int, round: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        self._noise(total, round)
        released = total.copy()
        metrics = {"l2_clip": self.clip.clipping.bound}
        return released, self.clip.finish(total, included, metrics), metrics

    def train_locally(self, model: Any, dataset: Any, loss_fn: Any, optimizer: Any, rng: RandomSource) -> float:
        raise ConfigurationError("client-level DP does not train locally with DP-SGD: use SampleLevelDP for that")

    def audit_settings(self) -> dict[str, Any]:
        return {"accountant": self.config.accountant, "delta": self.config.delta}


class CentralMechanism(_ClientLevel):
    """``CentralDP``'s rounds: the server adds N(0, (z (C + encoding margin))^2) to the decoded sum."""

    def _noise(self, total: np.ndarray, round: int) -> None:
        mech = self.mechanism()
        noise = CentralGaussian(noise_multiplier=self.config.noise_multiplier, l2_clip=mech.contribution_bound)
        noise.add_to(total, self._rng.child(f"round/{round}/server-noise"))


class DistributedMechanism(_ClientLevel):
    """``DistributedDP``'s rounds: each client's integer noise share in the round protocol's encoder.

    Noise is provisioned for the honest shares of the t = min_survivors(n) a round is sure to sum;
    ConfigurationError at construction for a protocol without integer encodings, and for a
    threshold the colluders could fill (Poisson samples go up to the population).
    """

    guards_against_server = True

    def __init__(self, config: DistributedDP, *, protocol: Any, population: int, clients_per_round: int,
                 dimension: int, rng: RandomSource) -> None:
        super().__init__(config, protocol=protocol, population=population, clients_per_round=clients_per_round,
                         dimension=dimension, rng=rng)
        mechanism = self.mechanism()
        protocol.with_encoder(mechanism.encoder())
        mechanism.honest_survivors(population if self.sampling_rate < 1.0 else clients_per_round)

    def round_protocol(self, base: Any, round: int) -> Any:
        """`base` carrying this round's encoder, its rotation from public round randomness."""
        seed = self._rng.child(f"round/{round}/rotation").token_bytes(32)
        return base.with_encoder(self.mechanism().encoder().for_round(seed))


class SampleLevelMechanism:
    """``SampleLevelDP``'s rounds: DP-SGD in each participant's local training; the unit is one example.

    Every participant of the trainer's cohort trains (no amplification by client sampling); a
    round's event is DP-SGD's for `local_steps` epochs. Loads torch.
    """

    client_level = False
    local_training = True
    sampling_rate = 1.0
    clipping: Clipping | None = None

    def __init__(self, config: SampleLevelDP, *, dimension: int, local_steps: int) -> None:
        from securefed.privacy.dpsgd import DPSGD

        self.config = config
        self.dpsgd: DPSGD | None = DPSGD(noise_multiplier=config.noise_multiplier,
                                         max_grad_norm=config.max_grad_norm, sampling_rate=config.sampling_rate)
        self.dimension = dimension
        self._steps = local_steps * self.dpsgd.steps_per_epoch

    def _dp(self) -> DPSGD:
        assert self.dpsgd is not None
        return self.dpsgd

    def runnable(self, n: int) -> bool:
        return True

    def start_round(self, round: int) -> None:
        pass

    def event(self, *, included: int, n: int, round: int) -> PrivacyEvent:
        return self._dp().event(included=included, n=n, round=round, steps=self._steps)

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        return self.event(included=max(n, 1), n=max(n, 1), round=round)

    def input_size(self, dimension: int) -> int:
        return dimension

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        return np.asarray(update, dtype=np.float64)  # the update is already private

    def round_protocol(self, base: Any, round: int) -> Any:
        return base

    def finish(self, total: np.ndarray, *, included: int, round: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        return total.copy(), total, {}

    def train_locally(self, model: Any, dataset: Any, loss_fn: Any, optimizer: Any, rng: RandomSource) -> float:
        return self._dp().train(model, dataset, loss_fn=loss_fn, optimizer=optimizer, rng=rng, steps=self._steps)

    def mechanism(self) -> ClientLevelMechanism:
        raise ConfigurationError("sample-level DP has no client-level mechanism: its noise is DP-SGD's")

    def audit_settings(self) -> dict[str, Any]:
        return {"accountant": self.config.accountant, "delta": self.config.delta}
