"""Ghost clipping (`securefed/privacy/_ghost.py`) against the reference torch.func path: proofs/dp.md Lemma D12."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from securefed.errors import ConfigurationError
from securefed.privacy import DPSGD, _ghost


def mse(out, target):
    return ((out - target) ** 2).mean()


def dpsgd(*, ghost, clip=1.0, chunk_floats=2**26):
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=clip, sampling_rate=0.5)
    dp.ghost_clipping, dp.chunk_floats = ghost, chunk_floats
    return dp


def norms_of(dp, model, batch, loss_fn):
    """Per-example gradient norms on `dp`'s path."""
    return torch.cat([n for n, _, _ in dp._per_example(model, batch, loss_fn)])


def sums_of(dp, model, batch, loss_fn):
    """Clipped sums (by parameter name) and per-example losses on `dp`'s path."""
    grads, losses = dp.clipped_sum(model, batch, loss_fn)
    names = {id(p): k for k, p in model.named_parameters()}
    return {names[id(p)]: g for p, g in grads}, losses


def covered(model, batch, loss_fn):
    with _ghost.Probes(_ghost.linear_layers(model)) as probes:
        probes.discover(model, batch[0][:1], batch[1][:1], loss_fn)
        return probes.covered()


def trainable(model):
    return {k for k, p in model.named_parameters() if p.requires_grad}


def assert_paths_agree(model, batch, loss_fn, *, chunk_floats=2**26):
    """Both paths at a clip between the smallest and largest per-example norm: same norms, sums, losses."""
    ref_norms = norms_of(dpsgd(ghost=False), model, batch, loss_fn)
    clip = math.sqrt(float(ref_norms.min()) * float(ref_norms.max())) or 1.0
    if len(ref_norms) > 1 and float(ref_norms.min()) < 0.99 * float(ref_norms.max()):
        assert bool((ref_norms < clip).any()) and bool((ref_norms > clip).any())  # both sides of C
    ghost = dpsgd(ghost=True, clip=clip, chunk_floats=chunk_floats)
    norms = norms_of(ghost, model, batch, loss_fn)
    grads, losses = sums_of(ghost, model, batch, loss_fn)
    ref_grads, ref_losses = sums_of(dpsgd(ghost=False, clip=clip), model, batch, loss_fn)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() == trainable(model)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-5 * max(1.0, float(g.abs().max())))
    torch.testing.assert_close(losses, ref_losses)


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    bias = draw(st.lists(st.booleans(), min_size=len(widths) - 1, max_size=len(widths) - 1))
    seq = draw(st.sampled_from([None, 1, 2, 5]))  # 2-D inputs, or (batch, seq, in)
    n = draw(st.integers(1, 8))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers = []
    for i, b in enumerate(bias):
        layers += [torch.nn.Linear(widths[i], widths[i + 1], bias=b), torch.nn.Tanh()]
    shape = (n,) if seq is None else (n, seq)
    x, y = torch.randn(*shape, widths[0]), torch.randn(*shape, widths[-1])
    return torch.nn.Sequential(*layers[:-1]), (x * draw(st.sampled_from([0.1, 1.0, 10.0])), y)


@given(mlps(), st.sampled_from([2**26, 40]))  # the whole batch at once, or a few examples per chunk
def test_fast_path_matches_the_reference_path_on_random_mlps(mlp, chunk_floats):
    model, batch = mlp
    assert covered(model, batch, mse) == trainable(model)  # the fast rule, not the fallback, is under test
    assert_paths_agree(model, batch, mse, chunk_floats=chunk_floats)


@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 7), st.integers(1, 7), st.integers(-8, 8),
       st.integers(0, 2**31 - 1))
def test_linear_weight_norm_identity(n, t, d_in, d_out, scale, seed):
    """||G_i^T A_i||_F from A and G alone, for T = 1, the Gram route and the materialized route."""
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d_in, generator=g_, dtype=torch.float64) * 10.0**scale
    g = torch.randn(n, t, d_out, generator=g_, dtype=torch.float64)
    direct = torch.linalg.vector_norm(torch.einsum("nto,nti->noi", g, a).flatten(1), dim=1)
    torch.testing.assert_close(_ghost._weight_norms(a, g, torch.nn.Linear(d_in, d_out)), direct,
                               rtol=1e-9, atol=0.0)


def test_float32_norms_of_large_activations_do_not_overflow():
    a, g = torch.full((1, 1, 4), 1e18), torch.full((1, 1, 3), 1e18)  # ||grad_W||^2 ~ 1e73 > float32 max
    norm = _ghost._weight_norms(a, g, torch.nn.Linear(4, 3))
    assert float(norm) == pytest.approx(2e18 * math.sqrt(3) * 1e18, rel=1e-6)


class EmbedThenLinear(torch.nn.Module):  # Embedding has no fast rule; its Linear sees (batch, seq, in)
    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.out = torch.nn.Embedding(11, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)

    def forward(self, tokens):
        return self.out(self.norm(self.embed(tokens))).mean(dim=1)


class TinyTransformer(torch.nn.Module):  # attention reads out_proj's weight functionally: it falls back
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.enc(self.embed(tokens)).mean(dim=1))


class ConstantInput(torch.nn.Module):  # a layer whose input is the same for every example, beside a bare parameter
    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(3, 4))
        self.lin, self.const, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x[:, None, :] + self.pos) + self.const(torch.ones(1, 3, 4)))).mean(dim=1)


class WeightUsedOutside(torch.nn.Module):  # `lin.weight` also enters the loss outside `lin`
    def __init__(self):
        super().__init__()
        self.lin, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x))) + (x @ self.lin.weight.T)[:, :3]


class NeverCalled(torch.nn.Module):  # like MultiheadAttention's out_proj: a Linear only read functionally
    def __init__(self):
        super().__init__()
        self.proj, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.proj.weight, self.proj.bias))


class CalledTwice(torch.nn.Module):  # one layer applied twice: both calls go into its per-example gradient
    def __init__(self):
        super().__init__()
        self.first, self.shared, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x))))))


class ScaledLinear(torch.nn.Linear):  # overrides forward: the rule's gradients would be off by the scale
    def forward(self, x):
        return torch.nn.functional.linear(x, 2.0 * self.weight, self.bias)


class ExtraParameter(torch.nn.Module):  # a parameter registered on a Linear but used by its parent
    def __init__(self):
        super().__init__()
        self.lin, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
        self.lin.gain = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) * self.lin.gain))


class Unused(torch.nn.Module):  # a layer that is never called: zero gradient, no calls to learn shapes from
    def __init__(self):
        super().__init__()
        self.spare, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(x)


def overridden():  # a subclass and an instance whose forward is not nn.Linear's
    model = torch.nn.Sequential(ScaledLinear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3))
    model[2].forward = lambda x: torch.nn.functional.linear(x, model[2].weight.exp(), model[2].bias)
    return model


def tied():  # two Linears sharing one weight
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3))
    model[2].weight = model[0].weight
    return model


def output_hooked():  # a user's hook rewrites a Linear's output; a pre-hook rewrites its input (still fast)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model[0].register_forward_hook(lambda m, args, out: out * 2.0)
    model[2].register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    return model


def frozen_bias():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)
    return model


def data(model, n=9):
    g = torch.Generator().manual_seed(2)
    if isinstance(model, (EmbedThenLinear, TinyTransformer)):
        return torch.randint(0, 11, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g)
    width = 5 if isinstance(model, (WeightUsedOutside, NeverCalled, CalledTwice, ExtraParameter, Unused)) else 4
    return torch.randn(n, width, generator=g) * 3.0, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention kernels
@pytest.mark.parametrize("make, fast", [
    (EmbedThenLinear, {"out.weight", "out.bias"}),
    (TinyTransformer, {"enc.linear1.weight", "enc.linear1.bias", "enc.linear2.weight", "enc.linear2.bias",
                       "head.weight", "head.bias"}),
    (ConstantInput, {"lin.weight", "lin.bias", "const.weight", "const.bias", "head.weight", "head.bias"}),
    (WeightUsedOutside, {"head.weight", "head.bias"}),
    (NeverCalled, {"head.weight", "head.bias"}),
    (CalledTwice, {"first.weight", "first.bias", "shared.weight", "shared.bias", "head.weight", "head.bias"}),
    (ExtraParameter, {"head.weight", "head.bias"}),
    (Unused, {"head.weight", "head.bias"}),
    (overridden, {"4.weight", "4.bias"}),
    (tied, {"4.weight", "4.bias"}),
    (output_hooked, {"2.weight", "2.bias"}),
    (frozen_bias, {"0.weight", "2.weight", "2.bias"}),
])
def test_layers_without_the_fast_rule_fall_back_and_the_mix_matches_the_reference(make, fast):
    torch.manual_seed(0)
    model = make()
    batch, loss_fn = data(model), torch.nn.functional.cross_entropy
    assert covered(model, batch, loss_fn) == fast
    assert_paths_agree(model, batch, loss_fn, chunk_floats=60)


def test_a_global_forward_hook_turns_the_fast_rule_off():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: out * 2.0 if isinstance(m, torch.nn.Linear) else None)
    try:
        assert _ghost.linear_layers(model) == {}
        assert_paths_agree(model, data(model), torch.nn.functional.cross_entropy)
    finally:
        handle.remove()


class Growing(torch.nn.Module):  # calls its layer once in the first forward, twice afterwards
    def __init__(self):
        super().__init__()
        self.lin, self.calls = torch.nn.Linear(4, 4), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) if self.calls == 1 else self.lin(self.lin(x))


def test_a_model_that_changes_its_computation_between_examples_is_refused():
    model = Growing()
    with pytest.raises(ConfigurationError, match="same computation for every example"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5).clipped_sum(
            model, (torch.randn(3, 4), torch.randn(3, 4)), mse)
