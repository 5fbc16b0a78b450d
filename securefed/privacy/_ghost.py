"""Per-example gradient norms and clipped sums of ``nn.Linear`` layers without per-example gradients.

Ghost clipping (Goodfellow 2015; Li et al. 2022, section 4; Opacus' fast gradient clipping).
A linear layer ``z_t = W a_t + b`` applied at T positions of one example (T = 1 for 2-D
inputs) with ``g_t = dloss/dz_t`` has gradients ``grad_W = G^T A`` and ``grad_b = sum_t g_t``,
so ``||grad_W|| = ||a|| ||g||`` when T = 1 and ``<A A^T, G G^T>^(1/2)`` otherwise, and the
batch's clipped sum is one matmul ``(c g)^T a``. The ``g_t`` come from ``torch.func``: a zero
probe added to each call's output is differentiated per example (``vmap`` over ``grad``)
instead of the weights, so each example is still computed on its own, exactly as the
reference path computes it. See ``proofs/dp.md`` Lemma D12.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from securefed.errors import ConfigurationError


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Candidate layers: ``nn.Linear`` forwards that nothing overrides or post-processes, with trainable
    parameters. :meth:`Probes.discover` keeps those whose parameters nothing else uses (tied weights,
    functional use elsewhere)."""
    if _module._global_forward_hooks or _module._global_backward_hooks or _module._global_backward_pre_hooks:
        return {}  # a global hook could change a layer's output before our probe sees it
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward or "forward" in vars(m):
            continue
        if m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            continue
        own = [(k, p) for k, p in m.named_parameters(recurse=False) if p.requires_grad]
        if own and all(k in ("weight", "bias") for k, _ in own):
            out[name] = m
    return out


class Probes:
    """Forward hooks on the fast layers: keep each call's input and add a zero probe to its output.

    Use as a context manager (the hooks are removed on exit). :meth:`discover` runs one example
    through the model to learn each layer's call shapes and drop layers whose parameters are used
    anywhere but in their own calls; :meth:`start` arms the probes for one traced example.
    """

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = dict(layers)
        self.shapes: dict[str, list[tuple[torch.Size, torch.dtype, torch.device]]] = {}
        self._probes: dict[str, list[torch.Tensor]] | None = None
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._handles = {
            name: m.register_forward_hook(self._hook(name), prepend=True, with_kwargs=True)
            for name, m in self.layers.items()
        }

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles.values():
            h.remove()

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> Any:
            calls = self._inputs.setdefault(name, [])
            calls.append(args[0] if args else kwargs["input"])
            if self._probes is None:  # discovery
                self.shapes.setdefault(name, []).append((out.shape, out.dtype, out.device))
                return None
            probes = self._probes.get(name, [])
            return out + probes[len(calls) - 1] if len(calls) <= len(probes) else None
        return hook

    def discover(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Run the batch of one example (`x`, `y`) and keep the layers whose every trainable parameter
        reaches the loss once per call of its layer and nowhere else (autograd graph edges)."""
        self._probes, self._inputs, self.shapes = None, {}, {}
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
        uses = _parameter_uses(getattr(loss, "grad_fn", None))
        for name, m in list(self.layers.items()):
            calls = len(self.shapes.get(name, []))
            if calls == 0 or any(p.requires_grad and uses.get(id(p), 0) != calls
                                 for p in m.parameters(recurse=False)):
                del self.layers[name]
                self.shapes.pop(name, None)
                self._handles.pop(name).remove()
        self._inputs = {}

    def covered(self) -> set[str]:
        """Qualified names of the parameters the fast rule handles."""
        return {_qualified(name, k) for name, m in self.layers.items()
                for k, p in m.named_parameters(recurse=False) if p.requires_grad}

    def floats_per_example(self) -> int:
        """Floats held per example: the inputs and output gradients, and the Gram matrices or gradient."""
        total = 0
        for name, m in self.layers.items():
            t = sum(math.prod(shape[:-1]) for shape, _, _ in self.shapes[name])
            total += t * (m.in_features + m.out_features) + (0 if t == 1 else _weight_floats(t, m))
        return total

    def zeros(self, n: int) -> dict[str, list[torch.Tensor]]:
        """Zero probes for `n` examples, one per call, shaped as each call's output."""
        return {name: [torch.zeros((n, *shape), dtype=dtype, device=device) for shape, dtype, device in calls]
                for name, calls in self.shapes.items()}

    def start(self, probes: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Arm `probes` for one forward pass; returns the dict that collects each call's input."""
        self._probes, self._inputs = probes, {}
        return self._inputs

    def check(self, inputs: dict[str, list[torch.Tensor]]) -> None:
        """Raise ConfigurationError unless every layer was called as often as in discovery."""
        for name, calls in self.shapes.items():
            if len(inputs.get(name, [])) != len(calls):
                raise ConfigurationError(f"layer {name!r} was called {len(inputs.get(name, []))} times per example, "
                                         f"{len(calls)} in the first example; DP-SGD needs the same computation "
                                         "for every example")

    def norms_and_sums(
        self, inputs: dict[str, list[torch.Tensor]], grads: dict[str, list[torch.Tensor]],
    ) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
        """Per-example norms of every covered parameter's gradient (each shaped (n,)), and a function
        from the clip factors (n,) to each covered parameter's clipped sum, by qualified name."""
        norms, acts = [], {}
        for name, m in self.layers.items():
            a = _positions(inputs[name], m.in_features)
            g = _positions(grads[name], m.out_features)
            acts[name] = (a, g)
            if m.weight.requires_grad:
                norms.append(_weight_norms(a, g, m))
            if m.bias is not None and m.bias.requires_grad:
                norms.append(torch.linalg.vector_norm(g.sum(dim=1), dim=1))

        def sums(factor: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {}
            for name, m in self.layers.items():
                a, g = acts[name]
                cg = (g * factor.to(g.dtype)[:, None, None]).flatten(0, 1)
                if m.weight.requires_grad:
                    out[_qualified(name, "weight")] = cg.T @ a.flatten(0, 1)
                if m.bias is not None and m.bias.requires_grad:
                    out[_qualified(name, "bias")] = cg.sum(dim=0)
            return out
        return norms, sums


def _positions(calls: list[torch.Tensor], width: int) -> torch.Tensor:
    """Each call's (n, 1, ..., width) tensor as (n, T, width), the calls' positions concatenated."""
    flat = [t.reshape(t.shape[0], -1, width) for t in calls]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _qualified(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _weight_floats(t: int, m: nn.Linear) -> int:
    # Li et al. 2022: Gram matrices (2 T^2 floats) when smaller than the gradient itself.
    return min(2 * t * t, m.in_features * m.out_features)


def _weight_norms(a: torch.Tensor, g: torch.Tensor, m: nn.Linear) -> torch.Tensor:
    """||G_i^T A_i||_F for each example i; `a` is (n, T, in), `g` is (n, T, out)."""
    t = a.shape[1]
    if t == 1:  # the product of norms: no squares that could overflow
        return torch.linalg.vector_norm(a[:, 0], dim=1) * torch.linalg.vector_norm(g[:, 0], dim=1)
    if 2 * t * t <= m.in_features * m.out_features:
        # float64: the sum of T^2 products can cancel, and an underestimated norm would clip too little.
        a64, g64 = a.double(), g.double()
        sq = ((a64 @ a64.transpose(1, 2)) * (g64 @ g64.transpose(1, 2))).sum(dim=(1, 2))
        return sq.clamp(min=0).sqrt().to(a.dtype)
    return torch.linalg.vector_norm(torch.einsum("nto,nti->noi", g, a).flatten(1), dim=1)


def _parameter_uses(root: Any) -> dict[int, int]:
    """How many autograd edges lead from the graph under `root` to each leaf parameter (by id)."""
    uses: dict[int, int] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            stack.append(nxt)
    return uses
