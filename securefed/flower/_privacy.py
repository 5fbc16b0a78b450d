"""Differential privacy on Flower: what the nodes and the server each do with a ``securefed.privacy`` configuration.

Client level, as in DP-FedAvg (``securefed.privacy.session``): each node clips its
update; with :class:`~securefed.privacy.DistributedDP` each node also adds its integer
noise share inside the protocol's encoding (the round's protocol carries the
mechanism as its encoder, with a rotation drawn from the round's public session id,
so server and nodes build the same one); with :class:`~securefed.privacy.CentralDP`
the server adds Gaussian noise to the decoded sum. Every included node weighs the
same. Provisioning, events and the budget's planned event are the trainer's own
(:class:`securefed.privacy.client_level.ClientLevelMechanism`), not a copy. See
``protocols/flower.md``, "Differential privacy".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from securefed.crypto.random import derive_key
from securefed.errors import ConfigurationError
from securefed.protocols.base import AggregationProtocol

if TYPE_CHECKING:
    from securefed.privacy import CentralDP, Clipping, DistributedDP
    from securefed.privacy.client_level import ClientLevelMechanism

    Privacy = CentralDP | DistributedDP

__all__ = ["check", "clipping", "describe", "mechanism", "round_protocol"]

# securefed.privacy is imported only where a configuration is used: without DP, a node's
# process (one per message) need not load it.


def check(config: object) -> None:
    """ConfigurationError unless `config` is None or a configuration the Flower runtime supports."""
    if config is None:
        return
    from securefed.privacy import AdaptiveClipping, CentralDP, DistributedDP

    if not isinstance(config, (CentralDP, DistributedDP)):
        raise ConfigurationError(
            "on Flower, privacy must be securefed.privacy.CentralDP or DistributedDP (sample-level DP "
            "belongs in the nodes' training function)"
        )
    if isinstance(config.clipping, AdaptiveClipping):
        raise ConfigurationError("adaptive clipping is not supported on Flower yet: use a fixed clip")


def clipping(config: Privacy) -> Clipping:
    """The configuration's clipping module (a number means flat L2 clipping)."""
    from securefed.privacy.client_level import clipping_module

    return clipping_module(config)


def mechanism(config: Privacy, protocol: AggregationProtocol, dim: int) -> ClientLevelMechanism:
    """The trainer's client-level mechanism (``securefed.privacy.client_level``) for updates of length `dim`:
    noise provisioned for the t - C honest shares, events counting honest shares only, the planned
    event the budget is checked against. Every node weighs the same and every available node trains
    (q = 1)."""
    from securefed.privacy.client_level import ClientLevelMechanism

    return ClientLevelMechanism(config, protocol=protocol, dimension=dim)


def describe(config: Privacy | None, protocol: AggregationProtocol, n: int, dim: int) -> dict[str, Any] | None:
    """What a node checks of the server's privacy settings for a round of n (None without privacy).

    The clip and the noise every party assumes, and with distributed noise the honest shares
    it is provisioned for: a node and a server that disagree would make the ledger wrong.
    """
    if config is None:
        return None
    mech = mechanism(config, protocol, dim)
    out: dict[str, Any] = {"config": type(config).__name__, "noise_multiplier": config.noise_multiplier,
                           "l2_clip": mech.l2_bound, "delta": config.delta}
    if mech.distributed:
        out.update(colluding=mech.colluding(n), honest_shares=mech.honest_survivors(n))
    return out


def round_protocol(protocol: AggregationProtocol, config: Privacy | None, *, session: bytes,
                   dim: int) -> AggregationProtocol:
    """The protocol of the round with this `session` id: with distributed DP, carrying the noise as its encoder."""
    if config is None:
        return protocol
    mech = mechanism(config, protocol, dim)
    if not mech.distributed:
        return protocol
    # The rotation comes from public round randomness every party knows: the session id.
    return protocol.with_encoder(mech.encoder().for_round(derive_key(session, "flower/dp-rotation")))
