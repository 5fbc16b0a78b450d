"""Federated LoRA fine-tuning of a small byte-level GPT-2 on Python's standard library.

Each client holds the source (code and docstrings) of one top-level stdlib package, so the
federation is naturally non-IID. The base model is built from a config (no download) and
pretrained centrally on the stdlib's single-file modules, the server's public text; the clients
then fine-tune LoRA adapters from ``peft`` under SecAgg+ with distributed DP (each client adds
its share of discrete Gaussian noise inside the masked sum). Only the adapters are trained,
sent and aggregated; the base stays frozen and identical everywhere.

    python examples/llm-lora/train.py            # the full configuration (a few minutes on 2 cores)
    python examples/llm-lora/train.py --small    # the test suite's configuration (seconds)

Writes ``results.json`` and ``perplexity.png`` to ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

# Nothing leaves the machine: the model is built from a config, never fetched, and no telemetry.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_var] = "1"

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import securefed as sf

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
#: One client per top-level package: asyncio's event loops, email's MIME parsing, unittest's
#: assertions... different vocabularies and styles, a naturally non-IID split.
PACKAGES = ("asyncio", "email", "json", "logging", "unittest", "importlib", "http", "xml")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: the model, the data per client, pretraining, and the federated rounds."""

    packages: tuple[str, ...] = PACKAGES
    bytes_per_client: int = 12_000       # the first bytes of each package's sources
    public_bytes_per_module: int = 1_500  # pretraining text: the start of each single-file module
    seq_len: int = 64                     # bytes per training window
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    lora_rank: int = 8
    pretrain_steps: int = 150
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 2.0                        # local SGD on the adapters (LoRA's B starts at 0: slow at small lr)
    server_lr: float = 1.0
    clip: float = 0.5                      # L2 bound on each client's adapter update
    noise_multiplier: float = 0.05         # std of the summed noise / clip (see the README on epsilon)
    delta: float = 1e-5
    seed: int = 0


SMALL = Config(packages=PACKAGES[:4], bytes_per_client=3_000, public_bytes_per_module=200, seq_len=32, n_embd=64,
               n_layer=2, n_head=2, lora_rank=4, pretrain_steps=20, rounds=3, batch_size=8, lr=0.5)


# -- data: bytes are the tokens ------------------------------------------------------------------

def package_text(name: str, limit: int) -> bytes:
    """The first `limit` bytes of a stdlib package's sources (its tests left out), files in sorted order."""
    root = STDLIB / name
    files = [f for f in sorted(root.rglob("*.py")) if "test" not in f.relative_to(root).parts[:-1]]
    out = bytearray()
    for f in files:
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def public_text(per_module: int) -> bytes:
    """The server's pretraining text: the start of every single-file stdlib module (no client's package)."""
    return b"".join(f.read_bytes()[:per_module] for f in sorted(STDLIB.glob("*.py")))


def windows(text: bytes, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level tokenization (token id = byte value, vocabulary 256) into non-overlapping windows:
    inputs and the next-byte targets."""
    ids = torch.tensor(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


def federation(cfg: Config) -> tuple[list[TensorDataset], TensorDataset]:
    """One dataset per package (its first 90% of windows) and the held-out split (the last 10% of each)."""
    clients, held_x, held_y = [], [], []
    for name in cfg.packages:
        x, y = windows(package_text(name, cfg.bytes_per_client), cfg.seq_len)
        cut = max(1, len(x) * 9 // 10)
        clients.append(TensorDataset(x[:cut], y[:cut]))
        held_x.append(x[cut:])
        held_y.append(y[cut:])
    return clients, TensorDataset(torch.cat(held_x), torch.cat(held_y))


# -- the model -----------------------------------------------------------------------------------

class ByteLM(nn.Module):
    """A causal LM over bytes whose forward returns the logits (what the trainer's loss_fn receives)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats; exp of it is the per-byte perplexity."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def base_model(cfg: Config) -> nn.Module:
    """A GPT-2 with a 256-byte vocabulary, built from its config with a seeded initialisation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: seeded runs repeat
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return GPT2LMHeadModel(config)


def pretrain(model: nn.Module, cfg: Config) -> float:
    """Central Adam on the public text (the server's own); returns the last loss."""
    x, y = windows(public_text(cfg.public_bytes_per_module), cfg.seq_len)
    net = ByteLM(model)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(math.log(256))
    net.train()
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = lm_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def with_adapters(model: nn.Module, cfg: Config) -> ByteLM:
    """The frozen base with LoRA adapters on every attention projection (q, k, v and the output)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True)  # GPT-2's Conv1D layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return ByteLM(get_peft_model(model, lora))


def is_adapter(name: str, p: nn.Parameter) -> bool:
    """The parameters a round trains and aggregates: LoRA's A and B matrices."""
    return "lora_" in name


# -- the federated run ---------------------------------------------------------------------------

def make_trainer(model: nn.Module, clients: list[TensorDataset], held_out: TensorDataset, cfg: Config, *,
                 parameters: Any = is_adapter, **kwargs: Any) -> sf.Trainer:
    """SecAgg+ with distributed discrete Gaussian noise; only the adapters enter the aggregate."""
    protocol = sf.protocols.SecAggPlus(value_range=4.0, value_bits=20)
    n = len(clients)
    # Each client's share is provisioned for the t shares a finished round is sure to sum: the sum of
    # all n then carries noise of std noise_multiplier x clip (the demo's convention, securefed/demo.py).
    t = protocol.min_survivors(n)
    privacy = sf.privacy.DistributedDP(noise_multiplier=cfg.noise_multiplier * math.sqrt(t / n), clipping=cfg.clip,
                                       delta=cfg.delta)
    return sf.Trainer(model, clients, protocol=protocol, privacy=privacy, parameters=parameters,
                      weighting="uniform", loss_fn=lm_loss, eval_dataset=held_out, local_epochs=cfg.local_epochs,
                      batch_size=cfg.batch_size, lr=cfg.lr, server_lr=cfg.server_lr, seed=cfg.seed, **kwargs)


def upload_bytes(trainer: sf.Trainer, dimension: int) -> int:
    """Bytes one client sends in a round of the trainer's protocol and DP for an update of `dimension`
    coordinates, from the protocol's wire layout (``message_sizes``)."""
    session = trainer.privacy_session
    protocol = trainer.protocol if session is None else session.protocol(trainer.protocol, 1)
    return sum(sent for _, sent in protocol.message_sizes(len(trainer.datasets), dimension).values())


def full_model_upload(cfg: Config, clients: list[TensorDataset], held_out: TensorDataset) -> tuple[int, int]:
    """(parameters, bytes per client per round) if the whole model were fine-tuned and aggregated instead,
    under the same protocol and DP (whose modulus grows with the dimension)."""
    full = base_model(cfg)
    trainer = make_trainer(full, clients, held_out, cfg, parameters=None, progress=False)
    dim = sum(p.numel() for p in full.parameters())
    return dim, upload_bytes(trainer, dim)


def run(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Pretrain the base, fine-tune the adapters federatedly; the run's numbers (also for the README)."""
    started = time.perf_counter()
    clients, held_out = federation(cfg)
    base = base_model(cfg)
    pretrain_loss = pretrain(base, cfg)
    if progress:
        print(f"pretrained the base on public text: loss {pretrain_loss:.3f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    base_parameters = sum(p.numel() for p in base.parameters())  # before peft adds the adapters in place
    model = with_adapters(base, cfg)
    def report(record: sf.training.RoundRecord) -> None:
        print(f"round {record.round}: perplexity {math.exp(record.metrics['eval_loss']):.3f}, epsilon "
              f"{record.epsilon:.4g}, {record.metrics['upload_bytes_per_client']:,.0f} B per client "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    trainer = make_trainer(model, clients, held_out, cfg, progress=False, on_round=report if progress else None)
    before = trainer.evaluate()["eval_loss"]
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = trainer.fit(rounds=cfg.rounds)
    changed = sorted(name for name, p in model.named_parameters() if not torch.equal(start[name], p.detach()))
    adapters = sum(p.numel() for name, p in model.named_parameters() if is_adapter(name, p))
    full_params, full_bytes = full_model_upload(cfg, clients, held_out)
    return {
        "config": dataclasses.asdict(cfg),
        "clients": {name: len(d) for name, d in zip(cfg.packages, clients)},
        "held_out_windows": len(held_out),
        "base_parameters": base_parameters,
        "adapter_parameters": adapters,
        "adapter_tensors": sorted(name for name, p in model.named_parameters() if is_adapter(name, p)),
        "changed_tensors": changed,  # what federated training moved: the adapters only
        "full_model_parameters": full_params,
        "pretrain_loss": pretrain_loss,
        "perplexity": [math.exp(before)] + [math.exp(r.metrics["eval_loss"]) for r in history.rounds],
        "epsilon": [r.epsilon for r in history.rounds],
        "delta": cfg.delta,
        "included": [list(r.included) for r in history.rounds],
        "upload_bytes_per_client": [r.metrics["upload_bytes_per_client"] for r in history.rounds],
        "adapter_upload_bytes": upload_bytes(trainer, adapters),
        "full_model_upload_bytes": full_bytes,
        "seconds": time.perf_counter() - started,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity per round, and bytes per client per round (adapters against the full model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl, eps = results["perplexity"], results["epsilon"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(range(len(ppl)), ppl, marker="o")
    left.set(xlabel="round (0: pretrained base)", ylabel="held-out perplexity per byte",
             title=f"SecAgg+ and distributed DP: epsilon {eps[-1]:.3g} at delta {results['delta']:g}")
    left.grid(alpha=0.3)
    sizes = [results["adapter_upload_bytes"], results["full_model_upload_bytes"]]
    labels = [f"adapters\n{results['adapter_parameters']:,} params",
              f"full model\n{results['full_model_parameters']:,} params"]
    bars = right.bar(labels, [s / 1e6 for s in sizes], color=["tab:green", "tab:gray"])
    right.bar_label(bars, labels=[f"{s / 1e6:.3f} MB" for s in sizes])
    right.set(ylabel="MB sent per client per round", title="upload per client per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the test suite's tiny configuration")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--threads", type=int, help="torch's threads (default: its own; 1 is faster on a busy machine)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and perplexity.png")
    args = parser.parse_args(argv)
    cfg = SMALL if args.small else Config()
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results, args.out / "perplexity.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or securefed[audit])")
    ppl = results["perplexity"]
    print(f"perplexity {ppl[0]:.2f} -> {ppl[-1]:.2f} per byte; epsilon {results['epsilon'][-1]:.4g} at delta "
          f"{cfg.delta:g}; upload per client per round {results['adapter_upload_bytes']:,} B (adapters) vs "
          f"{results['full_model_upload_bytes']:,} B (full model); {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
