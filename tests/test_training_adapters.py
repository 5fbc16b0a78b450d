"""Trainer(parameters=...): only the selected parameters are trained and aggregated (adapters on a frozen base)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import securefed as sf
import securefed.training as training
from securefed.encoding import packed_size
from securefed.errors import ConfigurationError
from securefed.protocols.wire import HEADER_SIZE


class Adapted(nn.Module):
    """A frozen base layer with a low-rank adapter (LoRA style) and a trainable head."""

    def __init__(self, d_in=6, d_out=3, rank=2):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(d_out, rank) * 0.3)
        self.head = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.head(self.base(x) + x @ self.lora_a.T @ self.lora_b.T)


def datasets(k=3, size=16):
    gen = torch.Generator().manual_seed(1)
    return [TensorDataset(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen))
            for _ in range(k)]


def spy_on_rounds(monkeypatch):
    """Record every input vector the trainer hands to the aggregation."""
    seen = []
    real = training.simulate_aggregation

    def spy(protocol, inputs, *args, **kwargs):
        seen.append([np.array(x) for x in inputs])
        return real(protocol, inputs, *args, **kwargs)

    monkeypatch.setattr(training, "simulate_aggregation", spy)
    return seen


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_selected_parameters_change_and_enter_the_aggregate(monkeypatch):
    seen = spy_on_rounds(monkeypatch)
    model = Adapted()
    before = snapshot(model)
    trainer = sf.Trainer(model, datasets(), protocol=sf.protocols.SecAggPlus(value_range=4.0),
                         parameters=lambda name, p: name.startswith("lora_"), weighting="uniform",
                         progress=False, lr=0.1)
    trainer.fit(rounds=2)
    after = snapshot(model)
    for name in ("base.weight", "base.bias", "head.weight", "head.bias"):
        assert torch.equal(before[name], after[name]), name  # frozen or unselected: untouched everywhere
    for name in ("lora_a", "lora_b"):
        assert not torch.equal(before[name], after[name]), name
    assert model.head.weight.requires_grad and not model.base.weight.requires_grad  # flags restored
    adapter_size = model.lora_a.numel() + model.lora_b.numel()
    assert all(x.size == adapter_size for inputs in seen for x in inputs)
    assert len(seen) == 2 and len(seen[0]) == 3


def test_the_round_and_its_upload_scale_with_the_selection():
    uploads = {}
    for label, select in (("adapters", ["lora_a", "lora_b"]), ("trainable", None)):
        model = Adapted()
        protocol = sf.protocols.SecAggPlus(value_range=4.0)
        trainer = sf.Trainer(model, datasets(), protocol=protocol, parameters=select, progress=False)
        record = trainer.fit(rounds=1).final
        dim = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad
                  and (select is None or name in select)) + 1  # + the example weight
        uploads[label] = record.metrics["upload_bytes_per_client"]
        # every byte a client sends in the round: the masked input is d k / 8 of it
        assert uploads[label] == sum(sent for _, sent in protocol.message_sizes(3, dim).values())
        masked = protocol.message_sizes(3, dim)["masked_input"][1]
        assert masked == HEADER_SIZE + packed_size(dim, protocol.encoder.modulus_bits(3))
    assert uploads["adapters"] < uploads["trainable"]


@settings(max_examples=10)
@given(st.sets(st.sampled_from(["lora_a", "lora_b", "head.weight", "head.bias"]), min_size=1))
def test_any_selection_by_names_trains_exactly_it(names):
    model = Adapted()
    before = snapshot(model)
    sf.Trainer(model, datasets(2, 8), parameters=sorted(names), progress=False, lr=0.2).fit(rounds=1)
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(names)


def test_bad_selections_are_refused():
    model = Adapted()
    for bad, what in ((["nope"], "no parameters named"), (["base.weight"], "requires_grad=False"),
                      (lambda name, p: False, "selects nothing"), ("lora_a", "sequence of parameter names")):
        with pytest.raises(ConfigurationError, match=what):
            sf.Trainer(model, datasets(), parameters=bad, progress=False)
