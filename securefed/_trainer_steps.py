"""The Trainer's local work on a device: where it runs, local SGD (with FedProx's proximal term), evaluation.

Only batches move: the model lives on the device for the whole run, each batch goes there
once, and each participant's update comes back to the host once (``encoding.flatten``) for
masking or encryption. DP-SGD draws its noise on the host from the party's CSPRNG (OS
randomness unless the run's secrets are seeded) and moves it to the device
(``privacy/dpsgd.py``): a device generator would be neither a CSPRNG nor follow
``reproducible_secrets``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from securefed.errors import ConfigurationError

__all__ = ["ProximalSGD", "evaluate", "local_optimizer", "resolve_device", "sgd"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cuda(dev: torch.device, asked: Any) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigurationError(f"device={asked!r} needs CUDA, which is not available here (torch.cuda.is_available() "
                                 "is False: no GPU, or a CPU-only torch build); use device='cpu' or 'auto'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigurationError(f"device={asked!r}: this machine has {count} CUDA device(s), numbered 0 to "
                                 f"{count - 1}; pick one of them")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def resolve_device(value: Any, model: nn.Module) -> torch.device:
    """The device the run trains on: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, a ``torch.device``, ``"auto"``
    (CUDA when available, else the CPU) or None (where `model`'s parameters are).

    ConfigurationError for a device that is not available here or a type torch cannot train on (``meta``).
    """
    if value is None:
        first = next(iter(model.parameters()), None)
        dev = torch.device("cpu") if first is None else first.device
    elif isinstance(value, str) and value == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif isinstance(value, torch.device):
        dev = value
    elif isinstance(value, str):
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            raise ConfigurationError(f"device={value!r} is not a device: use 'cpu', 'cuda', 'cuda:N', 'mps', "
                                     "'auto' or a torch.device") from None
    else:
        raise ConfigurationError(f"device must be a string ('cpu', 'cuda', 'cuda:N', 'mps', 'auto'), a torch.device "
                                 f"or None, got {type(value).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        return _cuda(dev, value)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigurationError(f"device={value!r} needs Apple's MPS, which is not available here; use 'cpu'")
        return dev
    raise ConfigurationError(f"device type {dev.type!r} cannot train a model here: use 'cpu', 'cuda', 'cuda:N', "
                             "'mps' or 'auto'")


class ProximalSGD(torch.optim.SGD):
    """torch's SGD on FedProx's local objective ``loss(w) + (mu/2) ||w - w_global||^2`` (Li et al. 2020).

    ``w_global`` is the parameters' value when the optimizer is made (the round's global model).
    Before each step every parameter with a gradient gains ``mu (w - w_global)``, the proximal
    term's gradient: the same as adding the term to the loss, without a second backward pass and
    also under DP-SGD, whose step sets the gradients itself (the term holds no data, so the
    privacy accounting is unchanged). Flower's ``FedProx`` strategy sends ``mu`` and lets the
    client add this term; its docstring states the same squared norm.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, mu: float, lr: float, momentum: float) -> None:
        params = list(params)
        super().__init__(params, lr=lr, momentum=momentum)
        self.mu = mu
        self.anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise NotImplementedError("ProximalSGD.step takes no closure")
        for p, anchor in zip(self.param_groups[0]["params"], self.anchors):
            if p.grad is not None:
                p.grad.add_(p - anchor, alpha=self.mu)
        return super().step()


def local_optimizer(params: list[torch.Tensor], *, lr: float, momentum: float, mu: float) -> torch.optim.Optimizer:
    """SGD on the participant's trainable `params`, with FedProx's term when ``mu > 0``.

    ConfigurationError when lr or mu is beyond the parameters' dtype (1e300 for float32): torch would
    raise RuntimeError at the first step."""
    for name, value in (("lr", lr), ("proximal_mu", mu)):
        top = min((torch.finfo(p.dtype).max for p in params if p.is_floating_point()), default=math.inf)
        if value > top:
            raise ConfigurationError(f"{name}={value!r} is beyond the model's parameters' range (at most {top:.4g}); "
                                     f"lower {name}")
    if mu > 0.0:
        return ProximalSGD(params, mu=mu, lr=lr, momentum=momentum)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _checked_loss(loss: Any) -> torch.Tensor:
    """What loss_fn returned, if it is a one-element tensor; ConfigurationError otherwise."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigurationError(f"loss_fn(output, target) must return a one-element tensor (the batch's loss), got "
                                 f"{type(loss).__name__}" + (f" of shape {tuple(loss.shape)}"
                                                             if isinstance(loss, torch.Tensor) else ""))
    return loss


def sgd(model: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer, loader: DataLoader, epochs: int, seed: int,
        device: torch.device) -> float:
    """`epochs` passes of minibatch SGD over `loader` on `device` (torch's global RNG seeded for the block, the
    device's too); the mean loss (without FedProx's term)."""
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                opt.zero_grad()
                loss = _checked_loss(loss_fn(model(xb), yb))
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, loss_fn: LossFn, device: torch.device) -> dict[str, float]:
    """Mean loss (and accuracy for class logits) of `model` on `dataset`, computed on `device`."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for xb, yb in DataLoader(dataset, batch_size=1024):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        out = model(xb)
        total_loss += float(_checked_loss(loss_fn(out, yb))) * len(yb)
        if out.ndim == 2 and yb.ndim == 1:
            correct += int((out.argmax(dim=1) == yb).sum())
        count += len(yb)
    metrics = {"eval_loss": total_loss / count}
    if out.ndim == 2 and yb.ndim == 1:
        metrics["eval_accuracy"] = correct / count
    return metrics
