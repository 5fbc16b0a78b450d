"""examples/llm-lora/ in its small configuration: federated LoRA on a byte-level GPT-2 under SecAgg+ and
distributed DP, from the command its README gives (``train.py --small``)."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the LoRA example needs the [llm] extra: pip install 'securefed[llm]'")
pytest.importorskip("peft", reason="the LoRA example needs the [llm] extra: pip install 'securefed[llm]'")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llm-lora" / "train.py"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")  # before transformers is imported: nothing may leave the machine
    spec = importlib.util.spec_from_file_location("llm_lora_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("llm-lora")
    module.main(["--small", "--out", str(out)])
    return module, json.loads((out / "results.json").read_text()), out


def test_the_hub_and_telemetry_are_off(example):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        assert os.environ[var] == "1", var


def test_perplexity_is_finite_and_below_the_uniform_baseline(example):
    _, results, _ = example
    ppl = results["perplexity"]
    assert len(ppl) == results["config"]["rounds"] + 1  # the pretrained base, then each round
    assert all(math.isfinite(p) and 1.0 <= p < 256.0 for p in ppl), ppl  # 256: uniform over the bytes


def test_only_the_adapters_changed(example):
    _, results, _ = example
    assert results["adapter_tensors"] and all("lora_" in name for name in results["adapter_tensors"])
    assert results["changed_tensors"] == results["adapter_tensors"]  # every adapter moved, nothing else did
    assert results["adapter_parameters"] < results["base_parameters"] == results["full_model_parameters"]


def test_each_client_uploads_the_adapters_only(example):
    module, results, _ = example
    # measured in every round, equal to the wire layout's size for an update of the adapters' dimension
    assert results["upload_bytes_per_client"] == [results["adapter_upload_bytes"]] * results["config"]["rounds"]
    assert results["adapter_upload_bytes"] < results["full_model_upload_bytes"]
    # the masked input packs each coordinate in the modulus' bits (more than 8 under this DP): the whole
    # model's upload is larger by at least a byte per parameter that is not an adapter
    extra = results["full_model_parameters"] - results["adapter_parameters"]
    assert results["full_model_upload_bytes"] - results["adapter_upload_bytes"] >= extra
    assert all(len(included) == len(results["clients"]) for included in results["included"])
    assert module.SMALL.packages == tuple(results["clients"])


def test_epsilon_is_finite_and_grows(example):
    _, results, _ = example
    eps = results["epsilon"]
    assert all(math.isfinite(e) and e > 0 for e in eps), eps
    assert eps == sorted(eps) and eps[0] < eps[-1]


def test_the_plot_is_written(example):
    pytest.importorskip("matplotlib")
    _, _, out = example
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
