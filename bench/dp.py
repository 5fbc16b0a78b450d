"""Accounting time for 10^4 steps, and one DP-SGD step on a 1M-parameter MLP next to the same step without DP.

Prints one JSON line. ``epsilon_ms``: a cold ``compute_epsilon`` (cache cleared) for the
Abadi et al. 2016 setting (q = 0.01, sigma = 4, 10^4 steps, delta = 1e-5), best of
`--repeat` (target <= 50 ms); ``ddg_epsilon_ms``: the same for the distributed discrete
Gaussian (d = 10^6, 100 clients). ``dpsgd_step_ms`` / ``sgd_step_ms``: one step on a
784-1024-256-10 MLP (1,068,810 parameters) with a batch of 256, DP-SGD (per-example norms
of the Linear layers without per-example gradients, clipping, Gaussian noise from the
CSPRNG) against plain SGD (one backward pass), all best of `--repeat` interleaved in one run;
``ratio`` is their quotient (Opacus reports 2-3x for such models). ``reference_*``: the same
DP-SGD step with ``ghost_clipping = False`` (every per-example gradient materialized by
torch.func). ``noise_ms``: drawing the step's 1,068,810 Gaussian noise values from the
CSPRNG, a part of every DP-SGD step that no clipping method removes.
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit

import torch

from securefed.crypto.random import RandomSource
from securefed.privacy import DPSGD, compute_epsilon, sampling
from securefed.privacy.accountant import _event_rdp


def best(f, repeat: int) -> float:
    """Fastest of `repeat` single calls (seconds)."""
    return min(timeit.repeat(f, repeat=repeat, number=1))


def cold(f):
    def run():
        _event_rdp.cache_clear()
        return f()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    abadi = dict(noise_multiplier=4.0, sampling_rate=0.01, steps=10_000, delta=1e-5)
    eps = compute_epsilon(**abadi)  # loads dp-accounting
    t_eps = best(cold(lambda: compute_epsilon(**abadi)), args.repeat)
    ddg = dict(mechanism="ddg", noise_multiplier=1.0, sampling_rate=0.01, steps=10_000, delta=1e-5, l2_clip=1.0,
               dimension=10**6, granularity=1e-5, num_clients=100)
    eps_ddg = compute_epsilon(**ddg)
    t_ddg = best(cold(lambda: compute_epsilon(**ddg)), args.repeat)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))  # benchmark data, not secret
    loss_fn = torch.nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def sgd_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.01)
    reference = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.01)
    reference.ghost_clipping = False
    rng = RandomSource(0)

    def step_with(d: DPSGD):
        return lambda: d.step(model, (x, y), loss_fn=loss_fn, optimizer=opt, expected_batch=float(args.batch),
                              rng=rng)

    def noise() -> None:
        for p in model.parameters():
            sampling.gaussian(rng, 1.0, p.numel())

    sgd_step(), step_with(dp)(), step_with(reference)()  # warm up every path
    # Interleaved, so that on a shared machine every path sees the same load.
    t_sgd, t_dp, t_ref, t_noise = (min(ts) for ts in zip(*(
        [best(f, 1) for f in (sgd_step, step_with(dp), step_with(reference), noise)] for _ in range(args.repeat))))
    print(json.dumps({
        "bench": "dp", "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "epsilon": round(eps, 4), "epsilon_ms": round(t_eps * 1e3, 2), "epsilon_target_ms": 50,
        "ddg_epsilon": round(eps_ddg, 4), "ddg_epsilon_ms": round(t_ddg * 1e3, 2),
        "mlp_parameters": params, "batch": args.batch,
        "dpsgd_step_ms": round(t_dp * 1e3, 1), "sgd_step_ms": round(t_sgd * 1e3, 1), "ratio": round(t_dp / t_sgd, 2),
        "reference_dpsgd_step_ms": round(t_ref * 1e3, 1), "reference_ratio": round(t_ref / t_sgd, 2),
        "noise_ms": round(t_noise * 1e3, 1),
    }))


if __name__ == "__main__":
    main()
