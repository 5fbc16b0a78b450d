"""One client-level DP round: its noise, the event it records, the event that bounds it, the budget check.

Shared by the trainer's :class:`~securefed.privacy.session.PrivacySession` (through
:mod:`securefed.privacy.mechanisms`) and the Flower strategy (``securefed.flower``), so that
both provision noise, account and refuse rounds alike. Where the noise enters is the
configuration's own :meth:`client_noise`: :class:`ServerNoise` (central DP) or
:class:`ClientShares` (distributed DP). See ``protocols/dp.md`` section 2 and ``proofs/dp.md``
D6 and D11.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from securefed.errors import ConfigurationError, PrivacyBudgetExceeded
from securefed.privacy.accountant import Accountant
from securefed.privacy.clipping import Clipping, FlatClipping
from securefed.privacy.distributed import DistributedDiscreteGaussian, DistributedSkellam
from securefed.privacy.events import DDGEvent, PrivacyEvent
from securefed.privacy.noise import CentralGaussian, NoiseModule, encoding_margin

if TYPE_CHECKING:
    from securefed.privacy.config import CentralDP, DistributedDP
    from securefed.privacy.mechanisms import Privacy

__all__ = [
    "ClientLevelMechanism", "ClientShares", "DistributedEncoder", "ServerNoise", "check_budget", "clipping_module",
]

#: The clients' integer encoders: what :meth:`ClientLevelMechanism.encoder` returns.
DistributedEncoder = DistributedDiscreteGaussian | DistributedSkellam


def clipping_module(config: CentralDP | DistributedDP) -> Clipping:
    """The configuration's clipping module (a number means flat L2 clipping)."""
    clip = config.clipping
    return clip if isinstance(clip, Clipping) else FlatClipping(l2_clip=float(clip))


class ServerNoise:
    """Central DP's noise placement: the server adds Gaussian noise to the decoded sum."""

    distributed = False

    def colluding(self, n: int) -> int:
        """No client's share is in the noise, so no colluding client lowers it."""
        return 0

    def encoder(self, mechanism: ClientLevelMechanism) -> DistributedEncoder:
        raise ConfigurationError("central DP has no client-side encoder")

    def contribution_bound(self, mechanism: ClientLevelMechanism) -> float:
        """C plus the protocol's encoding margin (the fixed-point encoder's rounding moves an update)."""
        return mechanism.l2_bound + encoding_margin(mechanism.protocol, mechanism.dimension)

    def noise(self, mechanism: ClientLevelMechanism) -> NoiseModule:
        return CentralGaussian(noise_multiplier=mechanism.config.noise_multiplier,
                               l2_clip=mechanism.contribution_bound)


class ClientShares:
    """Distributed DP's noise placement: each client's integer share inside the protocol's encoding."""

    distributed = True

    def __init__(self, config: DistributedDP) -> None:
        self.config = config

    def colluding(self, n: int) -> int:
        """C = ceil(colluding_fraction n): clients of a round of n that may pool their noise with the server."""
        return math.ceil(self.config.colluding_fraction * n - 1e-9)

    def encoder(self, mechanism: ClientLevelMechanism) -> DistributedEncoder:
        """The clients' integer encoder, provisioned for the mechanism's honest survivors."""
        config = self.config
        cls = DistributedDiscreteGaussian if config.mechanism == "ddg" else DistributedSkellam
        return cls(
            l2_clip=mechanism.l2_bound, noise_multiplier=config.noise_multiplier, dimension=mechanism.dimension,
            min_survivors=mechanism.honest_survivors, granularity=config.granularity, beta=config.beta,
            rotation=config.rotation, wrap_probability=config.wrap_probability,
        )

    def contribution_bound(self, mechanism: ClientLevelMechanism) -> float:
        """C: the encoder accounts its own rounding in the event."""
        return mechanism.l2_bound

    def noise(self, mechanism: ClientLevelMechanism) -> NoiseModule:
        return self.encoder(mechanism)


class ClientLevelMechanism:
    """The noise and accounting of client-level rounds of `protocol` on updates of length `dimension`.

    - ``config``: :class:`~securefed.privacy.CentralDP` (the server adds Gaussian noise of std
      z (C + the encoding's rounding margin), :attr:`contribution_bound`) or
      :class:`~securefed.privacy.DistributedDP` (each client adds an integer share
      provisioned for the t - C honest shares a finished round is sure to sum, t =
      ``protocol.min_survivors(n)``, C = ceil(colluding_fraction n));
    - ``l2_bound``: the round's L2 bound C (default: the clipping module's bound);
    - ``sampling_rate``: the Poisson rate of participants, recorded in each event.

    Raises ConfigurationError for another configuration, and (from :meth:`honest_survivors`,
    hence from encoding and accounting) for a round the colluders could fill.
    """

    def __init__(self, config: CentralDP | DistributedDP, *, protocol: Any, dimension: int,
                 l2_bound: float | None = None, sampling_rate: float = 1.0) -> None:
        placement = getattr(config, "client_noise", None)
        if not callable(placement) or not hasattr(config, "clipping"):
            raise ConfigurationError("client-level DP needs a CentralDP or DistributedDP configuration")
        self.config = config
        self.placement: ServerNoise | ClientShares = placement()
        self.protocol = protocol
        self.dimension = int(dimension)
        self.l2_bound = clipping_module(config).bound if l2_bound is None else float(l2_bound)
        self.sampling_rate = float(sampling_rate)

    @property
    def distributed(self) -> bool:
        return self.placement.distributed

    def colluding(self, n: int) -> int:
        """C: the clients of a round of n that may pool their noise with the server (0 for central noise)."""
        return self.placement.colluding(n)

    def honest_survivors(self, n: int) -> int:
        """t - C: the shares of a finished round of n that clients pooling with the server do not know."""
        t, c = self.protocol.min_survivors(n), self.colluding(n)
        if t - c < 1:
            raise ConfigurationError(
                f"a round of {n} may finish with {t} clients, all of whom may collude with the server "
                f"({c} colluding): raise the protocol's threshold or lower colluding_fraction"
            )
        return t - c

    def encoder(self) -> DistributedEncoder:
        """The clients' integer encoder (distributed DP), provisioned for :meth:`honest_survivors`."""
        return self.placement.encoder(self)

    @property
    def contribution_bound(self) -> float:
        """The L2 bound on what one client adds to the decoded sum: the sensitivity noise is provisioned for.

        Central noise: C plus the protocol's :func:`~securefed.privacy.noise.encoding_margin` (the
        fixed-point encoder's stochastic rounding moves a clipped update by up to sqrt(d) steps, and
        the noise std z (C + margin) covers it). Distributed noise: C; its encoder accounts its own
        rounding in the event (``contribution_bound`` of the encoder). ``proofs/dp.md`` section 2.
        """
        return self.placement.contribution_bound(self)

    def noise(self) -> NoiseModule:
        """The round's noise: the distributed encoder, or the server's Gaussian of std z (C + encoding margin)."""
        return self.placement.noise(self)

    def event(self, *, included: int, n: int, round: int | None = None) -> PrivacyEvent:
        """The event of a round of n whose sum holds `included` clients' inputs (only honest shares count)."""
        return self.noise().event(included=included - self.colluding(n), n=n, sampling_rate=self.sampling_rate,
                                  round=round)

    def planned_event(self, round: int, n: int) -> PrivacyEvent:
        """An event that costs at least what a round of n can cost, whoever of its participants survives.

        Distributed noise: the total noise of the t shares a finished round is sure to sum, and
        for the discrete Gaussian also tau of n shares (tau only grows with the number of shares
        and shrinks with their size): the formulas are monotone in both (``proofs/dp.md`` D11).
        """
        n = max(n, 1)
        if not self.distributed:
            return self.event(included=n, n=n, round=round)
        event = self.event(included=self.protocol.min_survivors(n), n=n, round=round)
        return dataclasses.replace(event, num_clients=n) if isinstance(event, DDGEvent) else event


def check_budget(accountant: Accountant, planned: PrivacyEvent, *, config: Privacy, round: int) -> None:
    """PrivacyBudgetExceeded if recording `planned` would take epsilon past ``config.target_epsilon``."""
    target = config.target_epsilon
    if target is None:
        return
    eps = accountant.epsilon_after(planned, config.delta)
    if eps > target:
        spent = accountant.epsilon(config.delta)
        raise PrivacyBudgetExceeded(
            f"round {round} could bring epsilon to {eps:.4g} at delta {config.delta:g}, above the target "
            f"{target:g} (spent so far: {spent:.4g} in {len(accountant)} rounds); stop training, or "
            "raise target_epsilon or the noise"
        )
