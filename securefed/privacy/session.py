"""One trainer's privacy: participant sampling, clipping, noise, accounting and the budget.

The trainer calls, each round: :meth:`PrivacySession.sample`, :meth:`before_round`
(raises PrivacyBudgetExceeded before anything is computed), :meth:`client_input`
per participant, :meth:`protocol` for the round's aggregation, and
:meth:`finish_round` (noise for the central mechanism, the adaptive clip's
update, the event with the participants actually included, the mean update).

DP-FedAvg conventions (McMahan et al. 2018; TensorFlow Federated's DP
aggregators): client-level DP samples each participant independently with
probability q = clients_per_round / population (Poisson, so the accountant's
subsampling applies), weighs every included participant the same and divides
the noised sum by the number included (public to the server; under the zero-out
neighbouring relation its distribution does not depend on anyone's data).
See ``protocols/dp.md`` section 2 and ``proofs/dp.md`` section 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy.accountant import Accountant
from securefed.privacy.client_level import ClientLevelMechanism, check_budget, clipping_module
from securefed.privacy.clipping import AdaptiveClipping, Clipping
from securefed.privacy.config import CentralDP, DistributedDP, PrivacyConfig, SampleLevelDP
from securefed.privacy.events import PrivacyEvent
from securefed.privacy.noise import CentralGaussian

if TYPE_CHECKING:
    from securefed.privacy.dpsgd import DPSGD  # torch: loaded only for sample-level DP

__all__ = ["PrivacySession"]


class PrivacySession:
    """The privacy state of one :class:`~securefed.training.Trainer` (``trainer.privacy_session``).

    `rng` is the session's secret randomness (Poisson coins, central noise, DP-SGD's coins, rotation
    seeds): the trainer passes a source keyed from the OS unless ``reproducible_secrets=True``.
    """

    def __init__(
        self, config: PrivacyConfig, *, protocol: Any, population: int, clients_per_round: int, dimension: int,
        local_steps: int, rng: RandomSource,
    ) -> None:
        if not isinstance(config, (CentralDP, DistributedDP, SampleLevelDP)):
            raise ConfigurationError(
                "privacy must be a securefed.privacy configuration: CentralDP, DistributedDP or SampleLevelDP"
            )
        self.config = config
        self.accountant = Accountant(config.accountant)
        self.population = population
        self.client_level = not isinstance(config, SampleLevelDP)
        self.sampling_rate = clients_per_round / population if self.client_level else 1.0
        self.local_training = isinstance(config, SampleLevelDP)
        self.metrics: dict[str, float] = {}
        self.released: np.ndarray | None = None
        self._audited = 0
        self._rng = rng
        self._local_steps = local_steps
        self.dpsgd: DPSGD | None = None
        self.clipping: Clipping | None = None
        if isinstance(config, SampleLevelDP):
            from securefed.privacy.dpsgd import DPSGD

            self.dpsgd = DPSGD(noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                               sampling_rate=config.sampling_rate)
            self.dimension = dimension
            return
        self.clipping = copy.deepcopy(clipping_module(config))  # adaptive state is the session's own
        self._update_multiplier = config.noise_multiplier
        if isinstance(self.clipping, AdaptiveClipping):
            expected = max(1.0, self.sampling_rate * population)
            self._count_stddev = self.clipping.count_stddev or 0.05 * expected
            self._update_multiplier = self.clipping.update_noise_multiplier(config.noise_multiplier,
                                                                             self._count_stddev)
        self.dimension = dimension + (1 if isinstance(self.clipping, AdaptiveClipping) else 0)
        self._protocol = protocol
        self._setup_round()
        if isinstance(config, DistributedDP):
            # Noise is provisioned for the honest shares of the t = min_survivors(n) a round is sure to sum.
            mechanism = self.mechanism()
            protocol.with_encoder(mechanism.encoder())  # ConfigurationError now for protocols without integers
            # ... and for a threshold the colluders could fill (Poisson samples go up to the population).
            mechanism.honest_survivors(population if self.sampling_rate < 1.0 else clients_per_round)

    # -- per-round parameters ---------------------------------------------------------

    def _setup_round(self) -> None:
        """The round's joint L2 bound: the clip, plus the scaled count bit when the clip adapts."""
        assert self.clipping is not None
        c = self.clipping.bound
        if isinstance(self.clipping, AdaptiveClipping):
            # Count bit b - 1/2 scaled by s = C z_update / sigma_count gets the update's noise std
            # z_update C; the pair (update, s (b - 1/2)) has norm <= C z_update / z.
            self._count_scale = c * self._update_multiplier / self._count_stddev
            self._bound = math.sqrt(c * c + (self._count_scale / 2.0) ** 2) * (1.0 + 1e-12)
        else:
            self._bound = c

    def mechanism(self) -> ClientLevelMechanism:
        """Client level: the round's noise, events and planned event (what Flower's strategy uses too)."""
        assert isinstance(self.config, (CentralDP, DistributedDP))
        return ClientLevelMechanism(self.config, protocol=self._protocol, dimension=self.dimension,
                                    l2_bound=self._bound, sampling_rate=self.sampling_rate)

    def _event(self, *, included: int, n: int, round: int) -> PrivacyEvent:
        if self.dpsgd is not None:
            return self.dpsgd.event(included=included, n=n, round=round,
                                    steps=self._local_steps * self.dpsgd.steps_per_epoch)
        return self.mechanism().event(included=included, n=n, round=round)

    # -- the round ------------------------------------------------------------------------

    def sample(self, round: int, fallback: Callable[[], list[int]]) -> list[int]:
        """Client level with q < 1: each participant in independently with probability q (CSPRNG coins)."""
        if not self.client_level or self.sampling_rate >= 1.0:
            return fallback()
        coins = self._rng.child(f"sample/{round}").fill(np.empty(self.population, dtype=np.uint64))
        return np.flatnonzero(coins < np.uint64(self.sampling_rate * 2.0**64)).tolist()

    def runnable(self, n: int) -> bool:
        """Whether a Poisson sample of n participants can make a round of the session's protocol.

        A sample that is empty, or smaller than the protocol accepts (SecAgg needs a few
        clients), runs nothing and releases nothing; whether it happens depends only on the
        coins, so skipping it costs no privacy (``proofs/dp.md`` 1.2).
        """
        if n == 0:
            return False
        if not self.client_level or self.sampling_rate >= 1.0:
            return True  # fixed cohorts: a protocol that cannot run them is a configuration error
        try:  # the protocol's minimum size, and the honest shares distributed noise needs
            self.mechanism().honest_survivors(n)
        except ConfigurationError:
            return False
        return True

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        """An event that costs at least what the round can cost, whoever of its n participants survives
        (client level: :meth:`ClientLevelMechanism.planned_event`; sample level: the round's own event)."""
        if self.dpsgd is not None:
            return self._event(included=max(n, 1), n=max(n, 1), round=round)
        return self.mechanism().planned_event(round, n)

    def before_round(self, round: int, n: int) -> None:
        """Raise PrivacyBudgetExceeded if a round of n participants could exceed the target epsilon."""
        if self.clipping is not None:
            self._setup_round()
        check_budget(self.accountant, self.planned_event(round, n), config=self.config, round=round)

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        """What a participant sends: its clipped update (plus the scaled count bit when the clip adapts)."""
        if self.clipping is None:  # sample level: the update is already private
            return np.asarray(update, dtype=np.float64)
        x = self.clipping.clip(update, layout)
        if isinstance(self.clipping, AdaptiveClipping):
            bit = 1.0 if self.clipping.unclipped(update) else 0.0
            x = np.append(x, self._count_scale * (bit - 0.5))
        return x

    def input_size(self, dimension: int) -> int:
        """The length of :meth:`client_input`'s vector for an update of `dimension` coordinates."""
        return dimension + 1 if isinstance(self.clipping, AdaptiveClipping) else dimension

    def protocol(self, base: Any, round: int) -> Any:
        """The round's protocol: with the distributed mechanism, `base` carrying this round's encoder."""
        if not isinstance(self.config, DistributedDP):
            return base
        seed = self._rng.child(f"round/{round}/rotation").token_bytes(32)  # public round randomness
        return base.with_encoder(self.mechanism().encoder().for_round(seed))

    def finish_round(self, total: np.ndarray, included: int, n: int, round: int) -> np.ndarray:
        """Record the round's event and return the mean update (central noise added here)."""
        metrics: dict[str, float] = {}
        total = np.array(total, dtype=np.float64, copy=True)
        if isinstance(self.config, CentralDP):
            noise = self.mechanism().noise()
            assert isinstance(noise, CentralGaussian)
            noise.add_to(total, self._rng.child(f"round/{round}/server-noise"))
        #: The sum this round released (noised under central DP): what an audit log may hash, never the raw sum.
        self.released = total.copy()
        if self.clipping is not None:
            metrics["l2_clip"] = self.clipping.bound
        if isinstance(self.clipping, AdaptiveClipping):
            fraction = (total[-1] / self._count_scale + included / 2.0) / included
            self.clipping.observe(fraction)
            metrics["unclipped_fraction"] = fraction
            total = total[:-1]
        self.accountant.record(self._event(included=included, n=n, round=round))
        metrics["epsilon"] = self.epsilon()
        self.metrics = metrics
        return total / included

    def epsilon(self) -> float:
        """Epsilon spent so far at the configuration's delta."""
        return self.accountant.epsilon(self.config.delta)

    def unaudited_ledger(self) -> list[dict[str, Any]]:
        """The ledger entries not yet handed to the audit log (those of the last finished round; none
        after an abort); marks them handed over."""
        out = self.accountant.ledger[self._audited:]
        self._audited = len(self.accountant)
        return out

    def resume(self, ledger: Sequence[Mapping[str, Any]]) -> None:
        """Start from the events of earlier runs (an audit log's ledger), so the budget counts them."""
        self.accountant = Accountant.from_ledger(ledger, self.config.accountant)
        self._audited = len(self.accountant)

    def audit_settings(self) -> dict[str, Any]:
        """The accounting an audit log declares: accountant and delta."""
        return {"accountant": self.config.accountant, "delta": self.config.delta}

    def train_locally(self, model: Any, dataset: Any, loss_fn: Any, optimizer: Any, rng: RandomSource) -> float:
        """Sample level: the participant's local training as DP-SGD; returns its mean loss."""
        assert self.dpsgd is not None
        return self.dpsgd.train(model, dataset, loss_fn=loss_fn, optimizer=optimizer, rng=rng,
                                steps=self._local_steps * self.dpsgd.steps_per_epoch)
