"""The public names of ../shared/API.md exist and keep their meaning (code outside the project calls them)."""

import inspect
import subprocess
import sys

import numpy as np
import pytest

import securefed as sf
from securefed import errors

SECAGG_PHASES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking")


def test_version_is_a_string():
    assert isinstance(sf.__version__, str) and sf.__version__


def test_error_hierarchy():
    assert issubclass(errors.InvalidInput, errors.SecureFedError) and issubclass(errors.InvalidInput, ValueError)
    assert issubclass(errors.ConfigurationError, errors.SecureFedError)
    assert issubclass(errors.ConfigurationError, ValueError)
    for cls in (errors.ProtocolAborted, errors.MessageRejected, errors.PrivacyBudgetExceeded):
        assert issubclass(cls, errors.SecureFedError)
    e = errors.ProtocolAborted(errors.AbortReason.TOO_FEW_SURVIVORS, "too few")
    assert e.reason in errors.AbortReason and str(e) == "too few"


def test_protocol_constructors_and_phases():
    p = sf.protocols
    assert p.Plain().phases
    for cls in (p.SecAgg, p.SecAggPlus):
        params = inspect.signature(cls).parameters
        assert {"threshold", "adversary", "value_range", "value_bits"} <= set(params)
        assert all(v.kind is inspect.Parameter.KEYWORD_ONLY for v in params.values())
        assert cls().phases == SECAGG_PHASES
        assert cls(threshold=0.5).phases == SECAGG_PHASES and cls(adversary="active").phases == SECAGG_PHASES
    assert {"degree", "corrupt_fraction", "dropout_fraction"} <= set(inspect.signature(p.SecAggPlus).parameters)
    assert "value_range" in inspect.signature(p.BFV).parameters
    assert p.CKKS().phases and p.BFV(value_range=1.0).phases


def test_simulate_aggregation_contract():
    sig = inspect.signature(sf.simulate_aggregation)
    assert list(sig.parameters)[:4] == ["protocol", "inputs", "dropouts", "seed"]
    xs = [np.full(3, 0.1 * i) for i in range(4)]
    res = sf.simulate_aggregation(sf.protocols.SecAggPlus(), xs, dropouts={2: "share_keys"}, seed=1)
    assert isinstance(res, sf.AggregationResult)
    assert res.total.dtype == np.float64 and res.included == (0, 1, 3)
    assert all(len(m) == 3 and isinstance(m[2], bytes) for m in res.server_view.messages)
    with pytest.raises(errors.ProtocolAborted):
        sf.simulate_aggregation(sf.protocols.SecAgg(), xs, dropouts=dict.fromkeys(range(3), "advertise_keys"))
    with pytest.raises(errors.InvalidInput):
        sf.simulate_aggregation(sf.protocols.SecAgg(), [np.array([np.nan])] * 3)


def test_compute_epsilon_contract():
    params = inspect.signature(sf.privacy.compute_epsilon).parameters
    assert {"mechanism", "noise_multiplier", "sampling_rate", "steps", "delta", "accountant"} <= set(params)
    eps = sf.privacy.compute_epsilon(mechanism="gaussian", noise_multiplier=4.0, sampling_rate=0.01, steps=10_000,
                                     delta=1e-5, accountant="rdp")
    assert isinstance(eps, float) and 0.9 < eps < 1.3


def test_trainer_contract():
    params = list(inspect.signature(sf.Trainer).parameters.values())
    assert [p.name for p in params[:4]] == ["model", "datasets", "protocol", "privacy"]
    assert "fit" in dir(sf.Trainer) and "rounds" in inspect.signature(sf.Trainer.fit).parameters
    assert {"round", "loss", "metrics", "epsilon", "included"} <= set(sf.RoundRecord.__dataclass_fields__)


@pytest.mark.parametrize("argv", [["demo", "--help"], ["audit", "verify", "--help"], ["audit", "report", "--help"]])
def test_command_line(argv):
    out = subprocess.run([sys.executable, "-m", "securefed", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if argv[0] == "demo":
        for flag in ("--rounds", "--protocol", "--no-dp", "plain", "secagg", "secagg+", "ckks", "bfv"):
            assert flag in out.stdout
