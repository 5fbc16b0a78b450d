"""The Trainer refuses nonsense at construction (issue 21): ConfigurationError for a setting, InvalidInput
for data, each message naming the argument, instead of an OverflowError, a TypeError inside torch, a NaN
model or a silently empty round."""

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import securefed as sf
from securefed.audit import verify
from securefed.encoding import flatten
from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import DistributedDP, SampleLevelDP
from securefed.privacy.clipping import AdaptiveClipping, PerLayerClipping
from tests._toy import federation, model


def trainer(**kw):
    data = kw.pop("datasets", federation())
    return sf.Trainer(model(), data, progress=kw.pop("progress", False), **kw)


def params(m):
    return flatten(dict(m.named_parameters()))[0]


# -- seed and datasets (table row: OverflowError, AttributeError, TypeError) ---------------------------


@pytest.mark.parametrize("seed", [-5, "x", 1.5, True, 2**64, np.float64(3.0)])
def test_a_seed_that_is_not_a_non_negative_64_bit_integer_is_refused(seed):
    with pytest.raises(ConfigurationError, match=r"seed must be None or an integer in \[0, 2\*\*64\)"):
        trainer(seed=seed)


@pytest.mark.parametrize("seed", [0, 2**64 - 1, np.int64(7), None])
def test_every_legal_seed_is_accepted(seed):
    t = trainer(seed=seed)
    assert t.seed == seed and (seed is None or type(t.seed) is int)


@pytest.mark.parametrize("datasets, words", [
    (None, "datasets must be a list of torch Datasets"),
    ("abc", "datasets must be a list of torch Datasets"),
    ({0: "x"}, "datasets must be a list of torch Datasets"),
    ([], "one dataset per participant"),
    ([1, 2], r"datasets\[0\] \(of type int\) is not a dataset"),
    ([TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))], "datasets \\[0\\] are empty"),
])
def test_datasets_that_are_not_a_list_of_datasets_are_invalid_input(datasets, words):
    with pytest.raises(InvalidInput, match=words):
        trainer(datasets=datasets)


def test_a_tuple_of_datasets_is_accepted():
    assert len(trainer(datasets=tuple(federation())).datasets) == 4


# -- local and server training numbers (table row: accepted, then torch errors or a NaN model) --------


@pytest.mark.parametrize("name, value", [
    ("lr", -1), ("lr", -0.0001), ("lr", math.inf), ("lr", math.nan), ("lr", True), ("lr", "0.1"),
    ("server_lr", math.inf), ("server_lr", -1.0), ("server_lr", 0.0), ("server_lr", math.nan),
    ("momentum", -0.1), ("momentum", 1.0), ("momentum", math.nan), ("momentum", False),
    ("batch_size", 0), ("batch_size", -3), ("batch_size", True), ("batch_size", 2.5), ("batch_size", "32"),
    ("local_epochs", 0), ("local_epochs", True), ("local_epochs", 1.0),
    ("clients_per_round", True), ("clients_per_round", 2.5), ("clients_per_round", 0),
    ("torch_threads", True), ("torch_threads", 0),
])
def test_a_nonsense_training_number_is_refused_at_construction(name, value):
    with pytest.raises(ConfigurationError, match=name):
        trainer(**{name: value})


def test_legal_training_numbers_are_accepted_and_stored_as_python_numbers():
    t = trainer(lr=np.float32(0.1), server_lr=2, momentum=0.0, batch_size=np.int64(8), local_epochs=3,
                clients_per_round=np.int32(2))
    assert (t.lr, t.server_lr, t.momentum, t.batch_size, t.local_epochs, t.clients_per_round) == (
        pytest.approx(0.1), 2.0, 0.0, 8, 3, 2)
    assert all(type(v) in (int, float) for v in (t.lr, t.server_lr, t.batch_size, t.clients_per_round))
    assert len(t.fit(1).rounds) == 1
    assert trainer(lr=0).lr == 0.0  # torch's bound; a probe whose update is the aggregate's noise alone


@pytest.mark.parametrize("rounds", [True, False, 0, -1, 2.0, "3", None])
def test_fit_refuses_rounds_that_are_not_a_positive_integer(rounds):
    t = trainer()
    before = params(t.model).copy()
    with pytest.raises(ConfigurationError, match="rounds must be an integer >= 1"):
        t.fit(rounds=rounds)
    assert t.history.rounds == [] and np.array_equal(params(t.model), before)


def test_fit_accepts_a_numpy_integer():
    assert len(trainer().fit(rounds=np.int64(2)).rounds) == 2


def test_an_update_that_overflows_the_model_is_an_error_and_leaves_the_model_unchanged():
    t = trainer(server_lr=1e300)  # finite, but the step overflows the float32 parameters
    before = params(t.model).copy()
    with pytest.raises(InvalidInput, match="inf or NaN .*lower server_lr"):
        t.fit(1)
    assert np.array_equal(params(t.model), before)


def test_local_training_that_diverges_names_the_participant_and_leaves_the_model_unchanged():
    data = federation()
    data[2] = TensorDataset(torch.full((20, 5), math.inf), data[2].tensors[1])
    t = trainer(datasets=data)
    before = params(t.model).copy()
    with pytest.raises(InvalidInput, match="participant 2's local training diverged"):
        t.fit(1)
    assert np.array_equal(params(t.model), before)


# -- other keywords ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    ({"protocol": "secagg"}, ConfigurationError, "protocol must be an aggregation protocol"),
    ({"protocol": sf.protocols.Plain}, ConfigurationError, r"pass an instance, e.g. Plain\(\)"),
    ({"loss_fn": 3}, ConfigurationError, "loss_fn must be None or a function"),
    ({"on_round": "print"}, ConfigurationError, "on_round must be None or a function"),
    ({"dropouts": {0: "upload"}}, ConfigurationError, "dropouts must be None or a function"),
    ({"progress": "yes"}, ConfigurationError, "progress must be True or False"),
    ({"reproducible_secrets": 1}, ConfigurationError, "reproducible_secrets must be True or False"),
    ({"algorithm": ["fedavg"]}, ConfigurationError, "algorithm must be"),
    ({"weighting": ["uniform"]}, ConfigurationError, "weighting must be"),
    ({"eval_dataset": 3}, InvalidInput, "eval_dataset must be None or a non-empty dataset"),
    ({"eval_dataset": TensorDataset(torch.zeros(0, 5))}, InvalidInput, "of length 0"),
    ({"audit_key": "x.key"}, ConfigurationError, "audit_key is given without audit_log"),
    ({"audit_log": 3}, ConfigurationError, "audit_log must be a path"),
    ({"audit_log": b"log.jsonl"}, ConfigurationError, "audit_log must be a path"),
])
def test_other_nonsense_keywords_are_refused_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        trainer(**kwargs)


def test_a_model_that_is_not_a_module_is_invalid_input():
    with pytest.raises(InvalidInput, match="model must be a torch.nn.Module, got str"):
        sf.Trainer("resnet", federation(), progress=False)


# -- dropout schedules (table row: AttributeError; an unknown participant silently ignored) ----------


@pytest.mark.parametrize("schedule, words", [
    (lambda r, ps: None, "must return a dict .*got NoneType"),
    (lambda r, ps: [0], "must return a dict .*got list"),
    (lambda r, ps: {7: "upload"}, r"named \[7\] in round 1: not participants \(the population is 0..3\)"),
    (lambda r, ps: {-1: "upload"}, r"named \[-1\]"),
    (lambda r, ps: {"0": "upload"}, r"named \['0'\]"),
    (lambda r, ps: {True: "upload"}, r"named \[True\]"),
])
def test_a_dropout_schedule_returning_nonsense_is_refused_before_training(schedule, words):
    t = trainer(dropouts=schedule)
    before = params(t.model).copy()
    with pytest.raises(ConfigurationError, match=words):
        t.fit(1)
    # nothing trained, and the round number is not used up
    assert np.array_equal(params(t.model), before) and t.history.rounds == []
    t.dropouts = None
    assert t.fit(1).final.round == 1


def test_a_schedule_may_name_a_participant_of_the_population_outside_this_round():
    t = trainer(clients_per_round=2, seed=3, dropouts=lambda r, ps: {p: "upload" for p in range(4) if p not in ps})
    assert len(t.fit(1).final.included) == 2


def test_a_schedule_with_numpy_integer_participants_is_accepted():
    t = trainer(dropouts=lambda r, ps: {np.int64(ps[0]): "upload"})
    assert t.fit(1).final.included == (1, 2, 3)


# -- the audit log's path and key (table row: FileNotFoundError, NotADirectoryError, TypeError) -------


def test_the_audit_log_folder_is_created(tmp_path):
    log = tmp_path / "new" / "deeper" / "audit.jsonl"
    trainer(audit_log=log).fit(1)
    assert log.exists() and Path(str(log) + ".key").exists()
    assert verify(log).ok


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_audit_log_on_proc_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="folder you can write to"):
        trainer(audit_log="/proc/securefed-audit.jsonl")


def test_an_audit_log_under_an_existing_file_is_a_configuration_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="cannot create the audit log's folder .*file is a file, not a folder"):
        trainer(audit_log=tmp_path / "file" / "audit.jsonl")


def test_an_audit_log_that_is_a_directory_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="is a directory; give a file in it"):
        trainer(audit_log=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_audit_log_in_a_read_only_folder_is_a_configuration_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ConfigurationError, match="folder you can write to"):
            trainer(audit_log=folder / "audit.jsonl")
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("key, words", [
    (b"xx", "audit key must be an Ed25519PrivateKey or the path of its PEM file, got bytes; to use PEM bytes"),
    (3, "got int"),
])
def test_an_audit_key_of_the_wrong_type_is_a_configuration_error(tmp_path, key, words):
    with pytest.raises(ConfigurationError, match=words):
        trainer(audit_log=tmp_path / "audit.jsonl", audit_key=key)


# -- the DP configurations the Trainer takes ---------------------------------------------------------


@pytest.mark.parametrize("make, words", [
    (lambda: DistributedDP(noise_multiplier=1.0, beta=-1), r"beta must be a number in \[0, 1\)"),
    (lambda: DistributedDP(noise_multiplier=1.0, beta=math.nan), "beta"),
    (lambda: DistributedDP(noise_multiplier=1.0, beta=1.0), "beta"),
    (lambda: DistributedDP(noise_multiplier=1.0, wrap_probability=2.0), r"wrap_probability must be a number in \(0"),
    (lambda: DistributedDP(noise_multiplier=1.0, wrap_probability=math.nan), "wrap_probability"),
    (lambda: DistributedDP(noise_multiplier=1.0, rotation="no"), "rotation must be True or False"),
    (lambda: SampleLevelDP(noise_multiplier=1.0, sampling_rate=True), "sampling_rate"),
    (lambda: AdaptiveClipping(target_quantile=True), "target_quantile"),
    (lambda: PerLayerClipping(layer_clips=3), "layer_clips must be a non-empty sequence"),
    (lambda: PerLayerClipping(layer_clips=[]), "layer_clips must be a non-empty sequence"),
])
def test_the_dp_configurations_refuse_nonsense_at_construction(make, words):
    with pytest.raises(ConfigurationError, match=words):
        make()


def test_legal_dp_configurations_are_accepted():
    DistributedDP(noise_multiplier=1.0, beta=0.0, wrap_probability=1e-9, rotation=False)
    DistributedDP(noise_multiplier=1.0, beta=np.exp(-0.5))
    SampleLevelDP(noise_multiplier=1.0, sampling_rate=1)
    assert PerLayerClipping(layer_clips=(1.0, 2)).layer_clips == (1.0, 2.0)
    assert AdaptiveClipping(target_quantile=1).target_quantile == 1.0



# -- found by the public-API fuzz (tests/test_api_fuzz.py) ----------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    # were TypeError (len of a 0-d array), or accepted and then ValueError/KeyError/RuntimeError inside torch
    ({"eval_dataset": np.array(1.0)}, InvalidInput, "eval_dataset must be None or a non-empty dataset"),
    ({"eval_dataset": np.array([1.0, 2.0])}, InvalidInput, r"\(input, target\) pairs"),
    ({"eval_dataset": bytearray(3)}, InvalidInput, "eval_dataset must be"),
    ({"eval_dataset": {"a": 1}}, InvalidInput, "eval_dataset must be"),
    ({"eval_dataset": [None]}, InvalidInput, "eval_dataset must be"),
    ({"datasets": [[1.0, 2.0]]}, InvalidInput, r"datasets\[0\] \(of type list\) is not a dataset"),
    # was ValueError: embedded null byte
    ({"audit_log": "a\x00b"}, ConfigurationError, "holds a NUL character"),
    # was torch's ValueError from its sampler (islice) at fit
    ({"batch_size": 2**63}, ConfigurationError, "batch_size must be an integer >= 1 \\(at most sys.maxsize\\)"),
])
def test_nonsense_the_fuzz_found_is_refused_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        trainer(**kwargs)


@pytest.mark.parametrize("name", ["lr", "proximal_mu"])
def test_a_rate_beyond_the_models_dtype_is_a_configuration_error(name):
    # float32 parameters cannot take lr = 1e300 (torch's RuntimeError at the first step)
    t = trainer(**{name: 1e300})
    before = params(t.model).copy()
    with pytest.raises(ConfigurationError, match=f"{name}=1e\\+300 is beyond the model's parameters' range"):
        t.fit(1)
    assert np.array_equal(params(t.model), before)


@pytest.mark.parametrize("loss_fn, words", [(lambda out, y: None, "got NoneType"),
                                            (lambda out, y: out, r"got Tensor of shape \(\d+, 3\)")])
def test_a_loss_fn_that_returns_no_scalar_tensor_is_a_configuration_error(loss_fn, words):
    # was AttributeError ('NoneType' object has no attribute 'backward') or torch's RuntimeError
    with pytest.raises(ConfigurationError,
                       match="loss_fn\\(output, target\\) must return a one-element tensor.*" + words):
        trainer(loss_fn=loss_fn).fit(1)


def test_under_dp_sgd_a_loss_fn_that_returns_none_is_a_configuration_error():
    # was torch.func's RuntimeError ("Expected f(*args) to return a Tensor")
    with pytest.raises(ConfigurationError, match="loss_fn\\(output, target\\) must return a one-element tensor"):
        trainer(loss_fn=lambda out, y: None, privacy=SampleLevelDP(noise_multiplier=1.0)).fit(1)
