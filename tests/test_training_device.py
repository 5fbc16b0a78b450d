"""The trainer's device (issue 23, point 1): where local training, evaluation and DP-SGD run.

This machine has no GPU: the CUDA cases check the refusal; the tests marked ``cuda`` run where
CUDA is available and compare a GPU run with the CPU's.
"""

import json

import numpy as np
import pytest
import torch

import securefed as sf
from securefed import optim
from securefed.encoding import flatten
from securefed.errors import ConfigurationError
from tests._toy import federation, model

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")


def params(m):
    return flatten(dict(m.named_parameters()))[0]


def trainer(m=None, **kw):
    data = federation()
    return sf.Trainer(model() if m is None else m, data, eval_dataset=data[0], lr=0.2, progress=False, seed=1, **kw)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_device_cpu_trains(device):
    t = trainer(device=device)
    h = t.fit(3)
    assert t.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in t.model.parameters())
    assert h.rounds[-1].loss < h.rounds[0].loss and "eval_accuracy" in h.final.metrics


def test_auto_is_cuda_when_available_else_the_cpu():
    assert trainer(device="auto").device.type == ("cuda" if CUDA else "cpu")


def test_the_device_is_in_the_audit_config(tmp_path):
    t = trainer(device="cpu", audit_log=tmp_path / "a.jsonl")
    t.fit(1)
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert first["body"]["config"]["device"] == "cpu"


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda"), torch.device("cuda", 0)])
def test_cuda_without_cuda_is_a_configuration_error(device):
    m = model()
    before = params(m).copy()
    with pytest.raises(ConfigurationError, match="CUDA, which is not available"):
        trainer(m, device=device)
    assert all(p.device.type == "cpu" for p in m.parameters()) and np.array_equal(params(m), before)


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "gpu", "cuda:x", "", 0, 1.5, ["cpu"]])
def test_a_device_that_is_no_training_device_is_refused(device):
    with pytest.raises(ConfigurationError, match="device"):
        trainer(device=device)


@cuda
def test_a_cuda_index_beyond_the_machine_is_refused():
    with pytest.raises(ConfigurationError, match="CUDA device"):
        trainer(device=f"cuda:{torch.cuda.device_count()}")


@cuda
def test_cuda_trains_like_the_cpu():
    on_cpu, on_gpu = trainer(device="cpu"), trainer(device="cuda")
    a, b = on_cpu.fit(3), on_gpu.fit(3)
    assert all(p.device.type == "cuda" for p in on_gpu.model.parameters())
    np.testing.assert_allclose(params(on_gpu.model), params(on_cpu.model), atol=1e-4)
    assert b.final.loss == pytest.approx(a.final.loss, rel=1e-3)


@cuda
def test_dp_sgd_and_fedprox_run_on_cuda():
    privacy = sf.privacy.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, delta=1e-5)
    t = trainer(device="cuda", privacy=privacy, proximal_mu=0.1, server_optimizer=optim.FedAdam())
    h = t.fit(2)
    assert h.final.epsilon > 0 and np.isfinite(params(t.model)).all()
    assert all(p.device.type == "cuda" for p in t.model.parameters())
