"""Sample-level DP-SGD inside one participant's local training (Abadi et al. 2016).

Each step: a Poisson sample of the participant's examples (each in with
probability ``sampling_rate``, coins from the party's CSPRNG); each example's
gradient with ``torch.func`` (``vmap`` over ``grad``), where ``nn.Linear`` layers
give only their per-example norms (ghost clipping, ``_ghost``); each gradient
clipped to L2 norm ``max_grad_norm`` over all trainable parameters; their sum plus
N(0, (noise_multiplier * max_grad_norm)^2) per coordinate, divided by the
expected batch size ``sampling_rate * len(dataset)`` (Opacus' convention); an
SGD step. An epoch is round(1 / sampling_rate) steps. The privacy unit is one
example; see ``proofs/dp.md`` section 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy import _ghost, sampling
from securefed.privacy.events import GaussianEvent, PrivacyEvent
from securefed.privacy.noise import NoiseModule

__all__ = ["DPSGD"]


class DPSGD(NoiseModule):
    """Per-example clipping and Gaussian noise in local SGD; the accountant's unit is one example."""

    mechanism = "gaussian"
    #: Per-example gradient floats held at once (see :meth:`clipped_sum`).
    chunk_floats: int = 2**26
    #: Norms and clipped sums of ``nn.Linear`` layers without per-example gradients (Lemma D12 of
    #: ``proofs/dp.md``); False materializes every layer's per-example gradients (the reference path).
    ghost_clipping: bool = True

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, sampling_rate: float) -> None:
        for name, v in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(sampling_rate, (int, float)) and 0.0 < sampling_rate <= 1.0):
            raise ConfigurationError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sampling_rate = float(sampling_rate)

    def __repr__(self) -> str:
        return (f"DPSGD(noise_multiplier={self.noise_multiplier!r}, max_grad_norm={self.max_grad_norm!r}, "
                f"sampling_rate={self.sampling_rate!r})")

    @property
    def steps_per_epoch(self) -> int:
        """round(1 / sampling_rate): one epoch sees every example once in expectation."""
        return max(1, round(1.0 / self.sampling_rate))

    def event(self, *, included: int = 1, n: int = 1, sampling_rate: float = 1.0, round: int | None = None,
              steps: int | None = None) -> PrivacyEvent:
        """The round's cost to one example of a participant that ran `steps` steps (default one epoch).

        Client sampling (`sampling_rate` here) is not used for amplification: an example
        pays for every round its participant may be in.
        """
        return GaussianEvent(noise_multiplier=self.noise_multiplier, sampling_rate=self.sampling_rate,
                             steps=self.steps_per_epoch if steps is None else steps, num_clients=included,
                             round=round)

    def describe(self) -> dict[str, object]:
        return {"noise": "DPSGD", "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sampling_rate": self.sampling_rate}

    def train(
        self, model: nn.Module, dataset: Dataset, *, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer, steps: int, rng: RandomSource,
    ) -> float:
        """Run `steps` DP-SGD steps on `dataset` with `optimizer`; returns the mean per-example loss.

        `loss_fn` must average over the batch (as torch's losses do by default). Raises
        ConfigurationError for models with batch normalization (per-example gradients
        are undefined when examples share batch statistics).
        """
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ConfigurationError("DP-SGD cannot train batch normalization layers; use GroupNorm or LayerNorm")
        size = len(dataset)  # type: ignore[arg-type]
        total_loss, count = 0.0, 0
        first = next((p for p in model.parameters() if p.requires_grad), None)
        device = torch.device("cpu") if first is None else first.device  # batches go where the model is
        model.train()
        for step in range(steps):
            # sampling_rate = 1 takes every example (every accepted rate runs: proofs/dp.md section 8).
            idx = sampling.poisson_sample(rng.child(f"sample/{step}"), size, self.sampling_rate)
            losses = self.step(model, _batch(dataset, idx, device), loss_fn=loss_fn, optimizer=optimizer,
                               expected_batch=self.sampling_rate * size, rng=rng.child(f"noise/{step}"))
            total_loss += float(losses.sum())
            count += int(losses.numel())
        return total_loss / max(count, 1)

    def step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | None, *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
        expected_batch: float, rng: RandomSource,
    ) -> torch.Tensor:
        """One DP-SGD step on `batch` (already sampled); returns the per-example losses."""
        grads, losses = self.clipped_sum(model, batch, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        for p, g in grads:
            # Drawn on the host from the party's CSPRNG (OS randomness unless the secrets are seeded), then
            # moved: a device generator is no CSPRNG and would not follow reproducible_secrets.
            noise = sampling.gaussian(rng, self.noise_multiplier * self.max_grad_norm, g.numel())
            noise_t = torch.from_numpy(noise).to(device=g.device, dtype=g.dtype)
            p.grad = g.add_(noise_t.reshape(g.shape)).div_(expected_batch)
        optimizer.step()
        return losses

    def clipped_sum(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[list[tuple[nn.Parameter, torch.Tensor]], torch.Tensor]:
        """Sum over `batch` of per-example gradients clipped to max_grad_norm, and the per-example losses.

        Each example is computed on its own (``vmap`` over ``grad_and_value``), in chunks of at most
        ``chunk_floats`` materialized floats (256 MiB of float32 by default), so memory stays bounded
        whatever the batch size. With ``ghost_clipping``, ``nn.Linear`` layers give their per-example
        norms and clipped sums from their inputs and output gradients without per-example gradients.
        Spec: ``protocols/dp.md`` section 6.
        """
        params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        if batch is None:
            return [(v, torch.zeros_like(v)) for v in params.values()], torch.zeros(0)
        sums: dict[str, torch.Tensor] = {}
        losses = []
        for norms, loss, weighted_sum in self._per_example(model, batch, loss_fn):
            # Opacus' factor: C / (norm + 1e-6) capped at 1 keeps every clipped norm strictly below C.
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for k, g in weighted_sum(factor).items():
                sums[k] = sums[k].add_(g) if k in sums else g
            losses.append(loss)
        return [(v, sums[k]) for k, v in params.items()], torch.cat(losses)

    def _per_example(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]]:
        """Per chunk of examples: the norms (n,) of their gradients over all trainable parameters, their
        losses (n,), and the map from weights (n,) to the weighted sum of their gradients by parameter.

        Parameters of the layers ``_ghost`` confirms take Lemma D12's rule; every other trainable
        parameter's per-example gradients are materialized, and the norms combine both.
        """
        from torch.func import functional_call, grad_and_value, vmap

        params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        with _ghost.Probes(_ghost.linear_layers(model) if self.ghost_clipping else {}) as probes:
            if probes.layers:
                probes.discover(model, batch[0][:1], batch[1][:1], loss_fn)
            fast = probes.covered()
            rest = {k: v.detach() for k, v in params.items() if k not in fast}
            fixed = {k: params[k].detach() for k in fast}
            buffers = {k: v.detach() for k, v in model.named_buffers()}

            def one(p: dict[str, torch.Tensor], z: dict[str, list[torch.Tensor]], x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
                inputs = probes.start(z)
                loss = loss_fn(functional_call(model, (p, fixed, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:  # torch.func's RuntimeError otherwise
                    raise ConfigurationError("loss_fn(output, target) must return a one-element tensor (the "
                                             f"example's loss), got {type(loss).__name__}")
                return loss, inputs

            # Differentiating the probes gives each fast layer's output gradients, not its weights'.
            per_example_fn = vmap(grad_and_value(one, argnums=(0, 1), has_aux=True), in_dims=(None, 0, 0, 0))
            floats = sum(v.numel() for v in rest.values()) + probes.floats_per_example()
            chunk = max(1, self.chunk_floats // max(1, floats))
            for lo in range(0, len(batch[1]), chunk):
                x, y = batch[0][lo : lo + chunk], batch[1][lo : lo + chunk]
                (grads, out_grads), (loss, inputs) = per_example_fn(rest, probes.zeros(len(y)), x, y)
                probes.check(inputs)
                fast_norms, fast_sum = probes.norms_and_sums(inputs, out_grads)
                norms = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads.values()]
                    + fast_norms), dim=0)

                def weighted_sum(w: torch.Tensor, grads: dict[str, torch.Tensor] = grads,
                                 fast_sum: Callable[[torch.Tensor], dict[str, torch.Tensor]] = fast_sum,
                                 ) -> dict[str, torch.Tensor]:
                    return {**{k: torch.einsum("b,b...->...", w, g) for k, g in grads.items()}, **fast_sum(w)}

                yield norms, loss.detach(), weighted_sum


def _batch(dataset: Dataset, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The examples `idx` of `dataset` as one batch on `device` (None for none)."""
    if idx.size == 0:
        return None
    if isinstance(dataset, TensorDataset):
        t = torch.from_numpy(idx)
        x, y = (tensor[t.to(tensor.device)] for tensor in dataset.tensors[:2])
    else:
        items: Any = default_collate([dataset[int(i)] for i in idx])
        x, y = items[0], items[1]
    return x.to(device), y.to(device)
