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

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy.accountant import Accountant
from securefed.privacy.client_level import ClientLevelMechanism, check_budget
from securefed.privacy.clipping import Clipping
from securefed.privacy.events import PrivacyEvent
from securefed.privacy.mechanisms import Privacy, RoundMechanism

if TYPE_CHECKING:
    from securefed.privacy.dpsgd import DPSGD

__all__ = ["PrivacySession"]

log = logging.getLogger("securefed.privacy")


class PrivacySession:
    """The privacy state of one :class:`~securefed.training.Trainer` (``trainer.privacy_session``).

    `config` is any :class:`~securefed.privacy.mechanisms.Privacy` (``CentralDP``,
    ``DistributedDP``, ``SampleLevelDP`` or a user's own): the session keeps the accountant
    and the budget, and delegates each round's sampling rate, client input, protocol, noise and
    events to the mechanism the configuration builds (:meth:`Privacy.session_mechanism`).
    `rng` is the session's secret randomness (Poisson coins, central noise, DP-SGD's coins, rotation
    seeds): the trainer passes a source keyed from the OS unless ``reproducible_secrets=True``.
    """

    def __init__(
        self, config: Privacy, *, protocol: Any, population: int, clients_per_round: int, dimension: int,
        local_steps: int, rng: RandomSource,
    ) -> None:
        if not callable(getattr(config, "session_mechanism", None)):
            raise ConfigurationError(
                f"privacy must be a securefed.privacy configuration (CentralDP, DistributedDP or SampleLevelDP) "
                f"or implement securefed.privacy.Privacy (session_mechanism(...)), got {type(config).__name__}"
            )
        self.config = config
        self.accountant = Accountant(config.accountant)
        self.population = population
        self._mechanism: RoundMechanism = config.session_mechanism(
            protocol=protocol, population=population, clients_per_round=clients_per_round, dimension=dimension,
            local_steps=local_steps, rng=rng)
        self.metrics: dict[str, float] = {}
        self.released: np.ndarray | None = None
        self._audited = 0
        self._rng = rng
        self._warned_server = False

    # -- the mechanism's parameters -----------------------------------------------------

    @property
    def client_level(self) -> bool:
        """Whether the unit of privacy is a participant (False: one example, DP-SGD)."""
        return self._mechanism.client_level

    @property
    def sampling_rate(self) -> float:
        """The Poisson rate of participants (1.0: fixed cohorts), recorded in client-level events."""
        return self._mechanism.sampling_rate

    @sampling_rate.setter
    def sampling_rate(self, q: float) -> None:
        self._mechanism.sampling_rate = q

    @property
    def local_training(self) -> bool:
        """Whether participants train with :meth:`train_locally` (sample level)."""
        return self._mechanism.local_training

    @property
    def dimension(self) -> int:
        """The length of a participant's input for the model (plus one for an adaptive clip's count)."""
        return self._mechanism.dimension

    @property
    def clipping(self) -> Clipping | None:
        """The clipping module participants apply (an adaptive clip moves), None at sample level."""
        return self._mechanism.clipping

    @property
    def count_stddev(self) -> float | None:
        """Adaptive clipping's count noise std in force (what the nodes must use), else None."""
        return getattr(self._mechanism, "count_stddev", None)

    @property
    def dpsgd(self) -> DPSGD | None:
        """Sample level's DP-SGD, None at client level."""
        return self._mechanism.dpsgd

    def mechanism(self) -> ClientLevelMechanism:
        """Client level: the round's noise, events and planned event (what Flower's strategy uses too)."""
        return self._mechanism.mechanism()

    def _event(self, *, included: int, n: int, round: int) -> PrivacyEvent:
        return self._mechanism.event(included=included, n=n, round=round)

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
        return n > 0 and self._mechanism.runnable(n)

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        """An event that costs at least what the round can cost, whoever of its n participants survives
        (client level: :meth:`ClientLevelMechanism.planned_event`; sample level: the round's own event)."""
        return self._mechanism.planned_event(round, n)

    def before_round(self, round: int, n: int) -> None:
        """Raise PrivacyBudgetExceeded if a round of n participants could exceed the target epsilon."""
        self._mechanism.start_round(round)
        check_budget(self.accountant, self.planned_event(round, n), config=self.config, round=round)

    def client_input(self, update: np.ndarray, layout: Sequence[int]) -> np.ndarray:
        """What a participant sends: its clipped update (plus the scaled count bit when the clip adapts)."""
        return self._mechanism.client_input(update, layout)

    def input_size(self, dimension: int) -> int:
        """The length of :meth:`client_input`'s vector for an update of `dimension` coordinates."""
        return self._mechanism.input_size(dimension)

    def protocol(self, base: Any, round: int) -> Any:
        """The round's protocol: with the distributed mechanism, `base` carrying this round's encoder."""
        return self._mechanism.round_protocol(base, round)

    def finish_round(self, total: np.ndarray, included: int, n: int, round: int) -> np.ndarray:
        """Record the round's event and return the mean update (central noise added here)."""
        total = np.array(total, dtype=np.float64, copy=True)
        #: The sum this round released (noised under central DP): what an audit log may hash, never the raw sum.
        self.released, total, metrics = self._mechanism.finish(total, included=included, round=round)
        self.accountant.record(self._event(included=included, n=n, round=round))
        metrics["epsilon"] = self.epsilon()
        if self.client_level and self.sampling_rate < 1.0:
            # whoever knows the Poisson sample (the server drawing it, co-participants on Flower) gets
            # no amplification: protocols/dp.md section 1
            metrics["epsilon_unamplified"] = self.epsilon_unamplified()
            self._warn_server(metrics["epsilon"], metrics["epsilon_unamplified"])
        self.metrics = metrics
        return total / included

    def _warn_server(self, amplified: float, unamplified: float) -> None:
        """Once per session: under distributed DP the server draws the sample, so its epsilon is unamplified."""
        if self._warned_server or not getattr(self._mechanism, "guards_against_server", False):
            return
        self._warned_server = True
        log.warning(
            "securefed: DistributedDP with Poisson sampling at q = %g: the server draws the sample, so the "
            "guarantee against the server is the unamplified epsilon (metrics['epsilon_unamplified'], %.4g now), "
            "not the reported, amplified %.4g; target_epsilon budgets the amplified one (protocols/dp.md section 1)",
            self.sampling_rate, unamplified, amplified)

    def epsilon(self) -> float:
        """Epsilon spent so far at the configuration's delta."""
        return self.accountant.epsilon(self.config.delta)

    def epsilon_unamplified(self) -> float:
        """Epsilon spent so far at the configuration's delta with every event's sampling rate taken as 1.0.

        Amplification by subsampling holds only against a party that does not learn who was sampled;
        this is the guarantee against one that does: the server that draws a Poisson sample (under
        ``DistributedDP`` the party the guarantee is claimed against), or co-participants shown the
        round's node list (Flower). Each released round is charged as if it included the privacy unit,
        through the same accountant (:meth:`Accountant.epsilon` with ``amplified=False``). Equal to
        :meth:`epsilon` when every event has rate 1 (q = 1). At sample level the events' rate is the
        examples' Poisson rate, drawn by each participant's own coins. The budget (``target_epsilon``)
        applies to :meth:`epsilon`. See ``protocols/dp.md`` section 1.
        """
        return self.accountant.epsilon(self.config.delta, amplified=False)

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
        return self._mechanism.audit_settings()

    def train_locally(self, model: Any, dataset: Any, loss_fn: Any, optimizer: Any, rng: RandomSource) -> float:
        """Sample level: the participant's local training as DP-SGD; returns its mean loss."""
        return self._mechanism.train_locally(model, dataset, loss_fn, optimizer, rng)
