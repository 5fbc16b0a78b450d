"""Typed privacy configurations: each builds its own round mechanism; the session only delegates.

A configuration implements ``securefed.privacy.Privacy`` (budget settings and
``session_mechanism``); ``PrivacySession`` has no switch on configuration types, so a user's
own configuration runs in a trainer like the library's three (``protocols/dp.md`` section 2).
"""

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, PrivacyBudgetExceeded
from securefed.privacy import (
    AdaptiveClipping,
    CentralDP,
    CentralMechanism,
    DistributedDP,
    DistributedMechanism,
    FlatClipping,
    GaussianEvent,
    PrivacySession,
    SampleLevelDP,
    SampleLevelMechanism,
    compute_epsilon,
    config,
    mechanisms,
    session,
)
from securefed.privacy.client_level import ClientLevelMechanism
from securefed.privacy.noise import CentralGaussian
from tests._toy import federation, model

DIM = 16


def build(privacy, protocol=None, population=8, clients_per_round=8):
    return privacy.session_mechanism(protocol=protocol or sf.protocols.SecAggPlus(), population=population,
                                     clients_per_round=clients_per_round, dimension=DIM, local_steps=1,
                                     rng=RandomSource(seed=bytes(32)))


@pytest.mark.parametrize(("privacy", "kind", "client_level", "size"), [
    (CentralDP(noise_multiplier=1.0), CentralMechanism, True, DIM),
    (CentralDP(noise_multiplier=1.0, clipping=AdaptiveClipping(count_stddev=1.0)), CentralMechanism, True, DIM + 1),
    (DistributedDP(noise_multiplier=1.0), DistributedMechanism, True, DIM),
    (SampleLevelDP(noise_multiplier=1.0), SampleLevelMechanism, False, DIM),
])
def test_each_configuration_builds_its_own_mechanism(privacy, kind, client_level, size):
    mech = build(privacy)
    assert type(mech) is kind
    assert mech.client_level is client_level and mech.local_training is (not client_level)
    assert mech.input_size(DIM) == size == mech.dimension  # the adaptive clip appends its count bit
    assert (mech.clipping is None) is (not client_level) and (mech.dpsgd is None) is client_level


def test_adaptive_clipping_is_a_part_of_either_client_level_mechanism():
    for privacy in (CentralDP(noise_multiplier=1.0, clipping=AdaptiveClipping(count_stddev=1.0)),
                    DistributedDP(noise_multiplier=1.0, clipping=AdaptiveClipping(count_stddev=1.0))):
        assert isinstance(build(privacy).clip, mechanisms.AdaptiveClip)
    assert isinstance(build(CentralDP(noise_multiplier=1.0)).clip, mechanisms.FixedClip)


def test_the_session_delegates_to_the_mechanism():
    privacy = DistributedDP(noise_multiplier=1.0, clipping=0.5)
    s = PrivacySession(privacy, protocol=sf.protocols.SecAggPlus(), population=8, clients_per_round=8,
                       dimension=DIM, local_steps=1, rng=RandomSource(seed=bytes(32)))
    mech = build(privacy)
    assert s.planned_event(3, 8) == mech.planned_event(3, 8)
    assert s.mechanism().event(included=6, n=8, round=2) == mech.event(included=6, n=8, round=2)
    assert s.audit_settings() == mech.audit_settings() == {"accountant": "rdp", "delta": privacy.delta}
    with pytest.raises(ConfigurationError, match="no client-level mechanism"):
        build(SampleLevelDP(noise_multiplier=1.0)).mechanism()


@pytest.mark.parametrize("bad", [object(), 1.0, "central", CentralGaussian(noise_multiplier=1.0, l2_clip=1.0)])
def test_an_object_without_session_mechanism_is_refused(bad):
    with pytest.raises(ConfigurationError, match="session_mechanism"):
        sf.Trainer(model(), federation(), privacy=bad, progress=False)


@dataclasses.dataclass(frozen=True)
class ServerGaussianDP:
    """A user's own configuration (no securefed base class): flat clip, server Gaussian, its own event."""

    noise_multiplier: float
    clip: float
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    calls: list = dataclasses.field(default_factory=list, compare=False)

    def session_mechanism(self, *, protocol, population, clients_per_round, dimension, local_steps, rng):
        return ServerGaussianRounds(self, dimension=dimension, rng=rng)


class ServerGaussianRounds:
    client_level, sampling_rate, local_training, dpsgd = True, 1.0, False, None

    def __init__(self, config, *, dimension, rng):
        self.config, self.dimension, self.rng = config, dimension, rng
        self.clipping = FlatClipping(l2_clip=config.clip)

    def runnable(self, n):
        return True

    def start_round(self, round):
        self.config.calls.append(("start", round))

    def event(self, *, included, n, round):
        return GaussianEvent(noise_multiplier=self.config.noise_multiplier, num_clients=included, round=round)

    def planned_event(self, round, n):
        return self.event(included=n, n=n, round=round)

    def input_size(self, dimension):
        return dimension

    def client_input(self, update, layout):
        self.config.calls.append(("input", len(update)))
        return self.clipping.clip(update, layout)

    def round_protocol(self, base, round):
        return base

    def finish(self, total, *, included, round):
        noise = CentralGaussian(noise_multiplier=self.config.noise_multiplier, l2_clip=self.config.clip)
        noise.add_to(total, self.rng.child(f"custom/{round}"))
        self.config.calls.append(("finish", round, included))
        return total.copy(), total, {"custom_clip": self.config.clip}

    def train_locally(self, model, dataset, loss_fn, optimizer, rng):
        raise AssertionError("client level: never called")

    def mechanism(self):
        raise ConfigurationError("no ClientLevelMechanism")

    def audit_settings(self):
        return {"accountant": self.config.accountant, "delta": self.config.delta}


def test_a_users_own_configuration_runs_in_the_trainer():
    z = 2.0
    spent = [compute_epsilon(noise_multiplier=z, sampling_rate=1.0, steps=r, delta=1e-5) for r in (1, 2, 3)]
    privacy = ServerGaussianDP(noise_multiplier=z, clip=0.5, target_epsilon=(spent[1] + spent[2]) / 2)
    t = sf.Trainer(model(), federation(), privacy=privacy, progress=False, seed=1)
    d = t.privacy_session.dimension
    h = t.fit(rounds=2)
    assert t.accountant.ledger == [
        GaussianEvent(noise_multiplier=z, num_clients=4, round=r).to_dict() for r in (1, 2)]
    assert [r.epsilon for r in h.rounds] == pytest.approx(spent[:2], rel=1e-9)
    assert all(r.metrics["custom_clip"] == 0.5 and r.included == (0, 1, 2, 3) for r in h.rounds)
    rounds = [c for c in privacy.calls if c[0] != "input"]
    assert rounds == [("start", 1), ("finish", 1, 4), ("start", 2), ("finish", 2, 4)]
    assert privacy.calls.count(("input", d)) == 8  # four participants a round
    assert np.isfinite(t.privacy_session.released).all()
    with pytest.raises(PrivacyBudgetExceeded, match="round 3"):  # the session's budget check, on its events
        t.run_round()
    assert len(t.accountant) == 2


def _names(module):
    return {name for name, obj in vars(module).items() if inspect.isclass(obj) and obj.__module__ == module.__name__}


def switches(source):
    """Where `source` names a configuration or clipping class, calls isinstance or issubclass, or imports
    the configurations (a `type(x) is CentralDP` names the class)."""
    classes = _names(config) | {"AdaptiveClipping", "FlatClipping", "PerLayerClipping"}
    found = []
    for n in ast.walk(ast.parse(source)):
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None
        if name in classes:
            found.append(f"{n.lineno}: {name}")
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("isinstance", "issubclass"):
            found.append(f"{n.lineno}: {n.func.id}()")
        if isinstance(n, ast.ImportFrom) and n.module == "securefed.privacy.config":
            found.append(f"{n.lineno}: import {n.module}")
    return sorted(found)


def test_the_session_has_no_switch_on_configuration_types():
    assert {"CentralDP", "DistributedDP", "SampleLevelDP"} <= _names(config)
    assert switches(Path(session.__file__).read_text(encoding="utf-8")) == []


def test_the_switch_check_sees_a_switch():
    # The check above on the kind of code the session had, so that its empty answer means something.
    old = ("from securefed.privacy.config import CentralDP\n"
           "if isinstance(config, (CentralDP, privacy.SampleLevelDP)):\n    pass\n")
    assert switches(old) == ["1: import securefed.privacy.config", "2: CentralDP", "2: SampleLevelDP",
                             "2: isinstance()"]


def test_client_level_mechanism_still_refuses_other_configurations():
    with pytest.raises(ConfigurationError, match="CentralDP or DistributedDP"):
        ClientLevelMechanism(SampleLevelDP(noise_multiplier=1.0), protocol=sf.protocols.Plain(), dimension=4)
