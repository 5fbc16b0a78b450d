"""Differential privacy on Flower: what the nodes and the server each do with a ``securefed.privacy`` configuration.

Client level, as in DP-FedAvg (``securefed.privacy.session``): each node clips its
update; with :class:`~securefed.privacy.DistributedDP` each node also adds its integer
noise share inside the protocol's encoding (the round's protocol carries the
mechanism as its encoder, with a rotation drawn from the round's public session id,
so server and nodes build the same one); with :class:`~securefed.privacy.CentralDP`
the server adds Gaussian noise to the decoded sum. Every included node weighs the
same. See ``protocols/flower.md``, "Differential privacy".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from securefed.crypto.random import derive_key
from securefed.errors import ConfigurationError
from securefed.protocols.base import AggregationProtocol

if TYPE_CHECKING:
    from securefed.privacy import CentralDP, Clipping, DistributedDP, NoiseModule

    Privacy = CentralDP | DistributedDP

__all__ = ["check", "clipping", "noise", "round_protocol"]

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
    from securefed.privacy import Clipping, FlatClipping

    clip = config.clipping
    return clip if isinstance(clip, Clipping) else FlatClipping(l2_clip=float(clip))


def _distributed(config: DistributedDP, protocol: AggregationProtocol, dim: int) -> Any:
    from securefed.privacy import DistributedDiscreteGaussian, DistributedSkellam

    # As PrivacySession._encoder: noise provisioned for the protocol's threshold t = min_survivors(n).
    cls = DistributedDiscreteGaussian if config.mechanism == "ddg" else DistributedSkellam
    return cls(
        l2_clip=clipping(config).bound, noise_multiplier=config.noise_multiplier, dimension=dim,
        min_survivors=protocol.min_survivors, granularity=config.granularity, beta=config.beta,
        rotation=config.rotation, wrap_probability=config.wrap_probability,
    )


def noise(config: Privacy, protocol: AggregationProtocol, dim: int) -> NoiseModule:
    """The round's noise mechanism for updates of length `dim` (for events and central noise)."""
    from securefed.privacy import CentralGaussian, DistributedDP

    if isinstance(config, DistributedDP):
        return _distributed(config, protocol, dim)
    return CentralGaussian(noise_multiplier=config.noise_multiplier, l2_clip=clipping(config).bound)


def round_protocol(protocol: AggregationProtocol, config: Privacy | None, *, session: bytes,
                   dim: int) -> AggregationProtocol:
    """The protocol of the round with this `session` id: with distributed DP, carrying the noise as its encoder."""
    if config is None:
        return protocol
    from securefed.privacy import DistributedDP

    if not isinstance(config, DistributedDP):
        return protocol
    mechanism = _distributed(config, protocol, dim)
    # The rotation comes from public round randomness every party knows: the session id.
    return protocol.with_encoder(mechanism.for_round(derive_key(session, "flower/dp-rotation")))  # type: ignore[attr-defined]
