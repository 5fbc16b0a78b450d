"""Differential privacy on Flower: what the nodes and the server each do with a ``securefed.privacy`` configuration.

Client level, as in DP-FedAvg: the server keeps a
:class:`~securefed.privacy.session.PrivacySession` (Poisson sampling at rate q, the
accountant, the adaptive clip), the trainer's, driven by the round engine
(``securefed.rounds``); each node clips its update (with adaptive clipping at the round's
clip, sent in the training configuration, and appends the scaled count bit through a
session of its own: the trainer's code); with :class:`~securefed.privacy.DistributedDP` each node also adds its integer
noise share inside the protocol's encoding (the round's protocol carries the
mechanism as its encoder, with a rotation drawn from the round's public session id,
so server and nodes build the same one; with adaptive clipping for the round's clip, which the
server's params name: :class:`RoundClip`); with :class:`~securefed.privacy.CentralDP`
the server adds Gaussian noise to the decoded sum. Every included node weighs the
same. Provisioning, events and the budget's planned event are the trainer's own
(:class:`securefed.privacy.client_level.ClientLevelMechanism`), not a copy. See
``protocols/flower.md``, "Differential privacy".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.random import RandomSource, derive_key
from securefed.errors import AbortReason, ConfigurationError, InvalidInput, ProtocolAborted
from securefed.protocols.base import AggregationProtocol

if TYPE_CHECKING:
    from securefed.privacy import CentralDP, Clipping, DistributedDP
    from securefed.privacy.client_level import ClientLevelMechanism
    from securefed.privacy.mechanisms import Privacy
    from securefed.privacy.session import PrivacySession

    ClientLevelDP = CentralDP | DistributedDP  # what the nodes and the server on Flower support (check)

__all__ = ["CLIP_KEY", "COUNT_STDDEV_KEY", "RoundClip", "at_round", "check", "client_input", "clipping", "describe",
           "for_request", "mechanism", "moving_encoder", "round_config", "round_protocol", "session", "session_state"]

#: The training configuration's keys for the round's adaptive clip and the noise std of its count (public).
CLIP_KEY, COUNT_STDDEV_KEY = "securefed-l2-clip", "securefed-count-stddev"

# securefed.privacy is imported only where a configuration is used: without DP, a node's
# process (one per message) need not load it.


def check(config: object) -> None:
    """ConfigurationError unless `config` is None or a configuration the Flower runtime supports."""
    if config is None:
        return
    from securefed.privacy import CentralDP, DistributedDP

    if not isinstance(config, (CentralDP, DistributedDP)):
        raise ConfigurationError(
            "on Flower, privacy must be securefed.privacy.CentralDP or DistributedDP (sample-level DP "
            "belongs in the nodes' training function)"
        )
    if isinstance(config, DistributedDP) and moving_encoder(config) and config.granularity is not None:
        # Nothing binds a round's params across nodes: an active server could send the other nodes a smaller
        # clip, and with a fixed rounding step their noise shares would shrink with it (spec section 7).
        raise ConfigurationError(
            "on Flower, DistributedDP with adaptive clipping needs granularity=None (the rounding step then "
            "follows each round's clip); a fixed granularity lets a server that sends the nodes different clips "
            "shrink the noise protecting one of them"
        )


@dataclasses.dataclass(frozen=True)
class RoundClip:
    """A ``DistributedDP`` configuration with adaptive clipping, at one round's clip and count noise std (the
    server session's public values): each node's noise encoder depends on the clip, so server and nodes
    build the round's encoder and ``params`` from these (``protocols/flower.md`` section 7)."""

    config: DistributedDP
    clip: float
    count_stddev: float

    @property
    def l2_bound(self) -> float:
        """The joint bound of (clipped update, scaled count bit) at this clip: the session's, same floats."""
        from securefed.privacy import AdaptiveClipping
        from securefed.privacy.mechanisms import AdaptiveClip

        base = clipping(self.config)
        assert isinstance(base, AdaptiveClipping)  # made only by at_round and for_request
        now = AdaptiveClipping(initial_clip=self.clip, target_quantile=base.target_quantile,
                               learning_rate=base.learning_rate, count_stddev=self.count_stddev)
        return AdaptiveClip(now, noise_multiplier=self.config.noise_multiplier, expected=1.0).bound


def moving_encoder(config: object) -> bool:
    """Whether the nodes' noise encoder moves with the round (``DistributedDP`` with adaptive clipping)."""
    from securefed.privacy import DistributedDP

    return isinstance(config, DistributedDP) and _adaptive(config.clipping)


def at_round(config: Any, s: PrivacySession | None) -> Any:
    """The server's privacy for the round about to start: `config`, or, when its encoder moves with the
    clip, a :class:`RoundClip` at the session's values of the round (after ``before_round``)."""
    if not moving_encoder(config) or s is None:
        return config
    values = round_config(s)
    return RoundClip(config, values[CLIP_KEY], values[COUNT_STDDEV_KEY])


def for_request(config: Any, params: str) -> Any:
    """A node's privacy for a request with ``params``: its own `config`, or, when its encoder moves with the
    clip, a :class:`RoundClip` at the clip and count std the server's params name for the round (the
    params check then covers every other setting). ProtocolAborted (refused) for values that are missing
    or not positive and finite, or that the configuration cannot run."""
    if not moving_encoder(config):
        return config
    try:
        values = json.loads(params).get("privacy", {}).get("round", {})
    except (ValueError, AttributeError):
        values = {}
    values = values if isinstance(values, dict) else {}
    out = RoundClip(config, _positive_finite(values.get("clip"), "the round's clip"),
                    _own_count_stddev(clipping(config), values.get("count_stddev")))
    try:
        out.l2_bound  # noqa: B018 - refuses a count std the noise multiplier cannot run with
    except (ConfigurationError, InvalidInput) as e:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"the round's adaptive clipping values: {e}") from None
    return out


def _configured(config: ClientLevelDP | RoundClip) -> ClientLevelDP:
    return config.config if isinstance(config, RoundClip) else config


def clipping(config: ClientLevelDP | RoundClip) -> Clipping:
    """The configuration's clipping module (a number means flat L2 clipping)."""
    from securefed.privacy.client_level import clipping_module

    return clipping_module(_configured(config))


def mechanism(config: ClientLevelDP | RoundClip, protocol: AggregationProtocol, dim: int) -> ClientLevelMechanism:
    """The trainer's client-level mechanism (``securefed.privacy.client_level``) for updates of length `dim`:
    noise provisioned for the t - C honest shares, events counting honest shares only, the planned
    event the budget is checked against, for the nodes' round protocol and ``params`` (the server's
    sampling rate and adaptive clip live in its session; a :class:`RoundClip` fixes the round's bound).
    Every node weighs the same."""
    from securefed.privacy.client_level import ClientLevelMechanism

    bound = config.l2_bound if isinstance(config, RoundClip) else None
    return ClientLevelMechanism(_configured(config), protocol=protocol, dimension=dim, l2_bound=bound)


def describe(config: ClientLevelDP | RoundClip | None, protocol: AggregationProtocol, n: int,
             dim: int) -> dict[str, Any] | None:
    """What a node checks of the server's privacy settings for a round of n (None without privacy).

    The clip and the noise every party assumes, and with distributed noise the honest shares
    it is provisioned for: a node and a server that disagree would make the ledger wrong. With a
    :class:`RoundClip`, ``round`` names the round's clip and count std (what the nodes build from).
    """
    if config is None:
        return None
    mech, base = mechanism(config, protocol, dim), _configured(config)
    out: dict[str, Any] = {"config": type(base).__name__, "noise_multiplier": base.noise_multiplier,
                           "l2_clip": mech.l2_bound, "delta": base.delta}
    if mech.distributed:
        out.update(colluding=mech.colluding(n), honest_shares=mech.honest_survivors(n))
    clip = clipping(config)
    if _adaptive(clip):  # the settings; the moving clip comes with the training configuration (and in "round")
        out["adaptive"] = {k: v for k, v in clip.describe().items() if k != "bound"}
    if isinstance(config, RoundClip):
        out["round"] = {"clip": config.clip, "count_stddev": config.count_stddev}
    return out


def _adaptive(clip: object) -> bool:
    from securefed.privacy import AdaptiveClipping

    return isinstance(clip, AdaptiveClipping)


def session(config: Privacy, protocol: AggregationProtocol, *, population: int, fraction: float, dimension: int,
            rng: RandomSource, ledger: Sequence[Mapping[str, Any]], clip: float | None) -> PrivacySession:
    """The server's privacy session for a run over `population` nodes sampled at `fraction`: Poisson at
    rate round(fraction population) / population when below 1 (the trainer's clients_per_round /
    population), resumed from `ledger` and, with adaptive clipping, from the saved `clip`."""
    from securefed.privacy import AdaptiveClipping
    from securefed.privacy.session import PrivacySession

    k = min(population, max(1, round(fraction * population)))
    if k / population != fraction:
        logging.getLogger("securefed.flower").warning(
            "securefed: fraction_train %g over %d nodes samples at q = %d/%d = %g (a whole number per population, "
            "as the trainer's clients_per_round)", fraction, population, k, population, k / population)
    out = PrivacySession(config, protocol=protocol, population=population, clients_per_round=k,
                         dimension=dimension, local_steps=1, rng=rng)
    out.resume(ledger)
    if clip is not None and isinstance(out.clipping, AdaptiveClipping):
        out.clipping.clip_norm = _positive_finite(clip, "the checkpoint's adaptive clip")
    return out


def session_state(s: PrivacySession) -> dict[str, Any]:
    """What a checkpoint keeps of the session besides its ledger: the population and the adaptive clip."""
    out: dict[str, Any] = {"population": s.population}
    if s.clipping is not None and _adaptive(s.clipping):
        out["clip"] = s.clipping.bound
    return out


def round_config(s: PrivacySession | None) -> dict[str, float]:
    """The round's public adaptive-clipping values for the nodes (after ``before_round``): the clip C and
    the count's noise std, both the session's own (:attr:`PrivacySession.count_stddev`)."""
    if s is None or s.clipping is None or (stddev := s.count_stddev) is None:
        return {}
    return {CLIP_KEY: s.clipping.bound, COUNT_STDDEV_KEY: stddev}


def _positive_finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _own_count_stddev(clip: Any, value: object) -> float:
    """The round's count noise std from the server: positive and finite, and the node's own when its
    configuration sets one (the server could otherwise shrink the count's noise; the default, 0.05 x the
    expected participants, depends on the sample and is the server's to compute)."""
    stddev = _positive_finite(value, "the round's count noise std")
    own = getattr(clip, "count_stddev", None)
    if own is not None and stddev != own:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"the round's count noise std {stddev!r} is not this "
                              f"node's configured count_stddev {own!r}; configure server and nodes alike")
    return stddev


def client_input(config: ClientLevelDP | RoundClip, update: np.ndarray, layout: Sequence[int],
                 round_config: Any) -> np.ndarray:
    """A node's input: its update clipped; with adaptive clipping at the round's clip from `round_config`
    (the training ConfigRecord), with the scaled count bit appended by the trainer's own
    :meth:`PrivacySession.client_input`. ProtocolAborted (refused) for a clip or count std that is not a
    positive finite number, or (:class:`RoundClip`) not the one the round's params name."""
    from securefed.privacy import AdaptiveClipping, CentralDP
    from securefed.privacy.session import PrivacySession
    from securefed.protocols.plain import Plain

    clip = clipping(config)
    if not isinstance(clip, AdaptiveClipping):
        return clip.clip(update, layout)
    values = round_config if round_config is not None else {}
    c = _positive_finite(values.get(CLIP_KEY), "the round's clip")
    stddev = _own_count_stddev(clip, values.get(COUNT_STDDEV_KEY))
    if isinstance(config, RoundClip) and (c, stddev) != (config.clip, config.count_stddev):
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "the training configuration's clip or count std is not "
                              "the one the round's parameters (and so its noise encoder) were made for")
    now = AdaptiveClipping(initial_clip=c, target_quantile=clip.target_quantile, learning_rate=clip.learning_rate,
                           count_stddev=stddev)
    base = _configured(config)  # the count bit is the same under either noise: a central session computes it
    try:  # a session at the round's clip: the count bit scaled exactly as the server's session scales it
        node = PrivacySession(CentralDP(noise_multiplier=base.noise_multiplier, clipping=now, delta=base.delta),
                              protocol=Plain(), population=1, clients_per_round=1, dimension=update.size,
                              local_steps=1, rng=RandomSource())
    except (ConfigurationError, InvalidInput) as e:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"the round's adaptive clipping values: {e}") from None
    return np.asarray(node.client_input(update, layout))


def round_protocol(protocol: AggregationProtocol, config: ClientLevelDP | RoundClip | None, *, session: bytes,
                   dim: int) -> AggregationProtocol:
    """The protocol of the round with this `session` id: with distributed DP, carrying the noise as its encoder."""
    if config is None:
        return protocol
    mech = mechanism(config, protocol, dim)
    if not mech.distributed:
        return protocol
    # The rotation comes from public round randomness every party knows: the session id.
    return protocol.with_encoder(mech.encoder().for_round(derive_key(session, "flower/dp-rotation")))
