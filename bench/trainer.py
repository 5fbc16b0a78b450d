"""The trainer's round: where its time goes, its peak memory, and what secure aggregation costs over Plain.

Each (configuration, protocol) runs in its own process, so that peak RSS is that process's own
high-water mark; this script prints one JSON line per configuration with:

- ``secure_*`` and ``plain_*``: the last round's wall time (``round_s``) split into
  ``local_training_s`` (participants' local SGD, flattening their updates included),
  ``client_protocol_s`` (the clients' protocol objects: encoding, masking, messages),
  ``server_protocol_s`` (the server's: unmasking, decoding, the sum) and ``other_s``
  (the rest: DP clipping and noise, the server optimizer, evaluation, loading the model);
- ``secure_over_plain``: the secure round's time over the Plain round's; ``..._cpu`` the same for
  the process CPU seconds (``round_cpu_s``, all threads), less sensitive to a shared machine's load;
- ``peak_rss_growth_mb``: the secure round's process high-water mark (VmHWM, every round
  run) minus its RSS after building the model and data, also as ``..._over_model``, a
  multiple of the trained parameters' fp32 size (issue 23's acceptance: <= 8 at 20
  participants and 25M parameters under SecAgg+); ``plain_peak_rss_growth_mb`` the same
  for the Plain run.

Before the baseline is read, a tiny round of the same protocol loads the compiled kernels, so
that their one-time memory is not counted as the round's.

Configurations (``--list``): ``mlp25m_n20`` (a 25.2M-parameter MLP on random data, 20
clients, SecAgg+ against Plain, 2 rounds), ``mlp25m_n100`` (the same with 100 clients, 1
round), ``lora`` (``examples/llm-lora/``: its model and data, SecAgg+ with distributed DP
against Plain without DP, only the adapters aggregated; listed when the example exists) and
``mlp2m_n20`` (1.7M parameters, 20 clients: a smoke run, ``--quick``). Default: ``mlp25m_n20`` and ``lora``.

    python bench/trainer.py                       # the issue's configurations
    python bench/trainer.py --only mlp25m_n100    # the 100-participant figure (minutes)
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procmem  # bench/procmem.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "examples" / "llm-lora" / "train.py"

CONFIGS: dict[str, dict[str, Any]] = {
    "mlp25m_n20": {"kind": "mlp", "width": 4096, "clients": 20, "rounds": 2},
    "mlp25m_n100": {"kind": "mlp", "width": 4096, "clients": 100, "rounds": 1},
    "mlp2m_n20": {"kind": "mlp", "width": 640, "clients": 20, "rounds": 2},
    "lora": {"kind": "lora", "rounds": 2},
}
DEFAULT = ("mlp25m_n20", "lora")
EXAMPLES_PER_CLIENT, BATCH, FEATURES, CLASSES = 64, 32, 1024, 10


class Clock:
    """Seconds spent in wrapped callables, by label; an inner call of the same label is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: set[str] = set()

    def wrap(self, label: str, f: Any) -> Any:
        @functools.wraps(f)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if label in self._open:
                return f(*args, **kwargs)
            self._open.add(label)
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
                self._open.discard(label)
        return timed


def _instrument(trainer: Any, clock: Clock) -> None:
    """Time the trainer's local training and its protocol's client and server objects.

    The protocol's client and server classes are wrapped, not their instances: a bound method kept on
    an instance would make a reference cycle and keep the round's model-sized arrays alive.
    """
    trainer._local_update = clock.wrap("local_training", trainer._local_update)
    cls = type(trainer.protocol)
    make_client, make_server = cls.client, cls.server
    wrapped: set[type] = set()

    def wrap_class(kind: type, label: str, names: tuple[str, ...]) -> None:
        if kind not in wrapped:
            wrapped.add(kind)
            for name in names:
                setattr(kind, name, clock.wrap(label, getattr(kind, name)))

    def client(self: Any, *args: Any, **kwargs: Any) -> Any:
        c = make_client(self, *args, **kwargs)
        wrap_class(type(c), "client_protocol", ("handle", "set_input"))
        return c

    def server(self: Any, *args: Any, **kwargs: Any) -> Any:
        s = make_server(self, *args, **kwargs)
        wrap_class(type(s), "server_protocol", ("requests", "receive", "finish_phase", "result"))
        return s

    cls.client, cls.server = client, server  # type: ignore[method-assign]


def _mlp(width: int, clients: int, seed: int = 0) -> tuple[Any, list[Any]]:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, FEATURES), nn.ReLU(), nn.Linear(FEATURES, CLASSES))
    g = torch.Generator().manual_seed(seed)
    data = [TensorDataset(torch.randn(EXAMPLES_PER_CLIENT, FEATURES, generator=g),
                          torch.randint(0, CLASSES, (EXAMPLES_PER_CLIENT,), generator=g)) for _ in range(clients)]
    return model, data


def _lora_module() -> Any:
    spec = importlib.util.spec_from_file_location("llm_lora_train", LORA)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _trainer(cfg: dict[str, Any], protocol: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, a function making the trainer): the model and data are built here, the trainer later."""
    import securefed as sf

    if cfg["kind"] == "mlp":
        model, data = _mlp(cfg["width"], cfg["clients"], seed)
        proto = sf.protocols.SecAggPlus() if protocol == "secagg+" else sf.protocols.Plain()
        return model, lambda: sf.Trainer(model, data, protocol=proto, batch_size=BATCH, lr=0.01, seed=seed,
                                         progress=False)
    lora = _lora_module()
    c = lora.Config(rounds=cfg["rounds"])
    clients, held_out = lora.federation(c)
    model = lora.with_adapters(lora.base_model(c), c)  # untrained base: a round's cost does not depend on it
    if protocol == "secagg+":
        return model, lambda: lora.make_trainer(model, clients, held_out, c, progress=False)
    return model, lambda: sf.Trainer(model, clients, protocol=sf.protocols.Plain(), parameters=lora.is_adapter,
                                     weighting="uniform", loss_fn=lora.lm_loss, eval_dataset=held_out,
                                     local_epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr,
                                     server_lr=c.server_lr, seed=c.seed, progress=False)


def _warm_up(cfg: dict[str, Any], protocol: str) -> None:
    """A tiny round of the same kind: loads torch's and the protocol's compiled kernels before the baseline."""
    small = dict(CONFIGS["mlp2m_n20"], width=8, clients=5)
    _trainer(small, protocol)[1]().run_round()


def measure(name: str, protocol: str) -> dict[str, Any]:
    """One configuration under one protocol, in this process."""
    import torch

    import securefed as sf

    cfg = CONFIGS[name]
    _warm_up(cfg, protocol)
    _model, make = _trainer(cfg, protocol)
    gc.collect()
    base = procmem.status()["VmRSS"]
    procmem.reset_peak()
    trainer = make()
    trained = sum(p.numel() for p in trainer._params().values())
    clock = Clock()
    _instrument(trainer, clock)
    for _ in range(cfg["rounds"]):
        clock.seconds.clear()
        t, cpu = time.perf_counter(), time.process_time()
        record = trainer.run_round()
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = procmem.status()["VmHWM"]
    split = {f"{k}_s": round(clock.seconds.get(k, 0.0), 3)
             for k in ("local_training", "client_protocol", "server_protocol")}
    model_mb = 4 * trained / 2**20
    return {
        "protocol": protocol, "participants": len(trainer.datasets), "trained_parameters": trained,
        "round_s": round(wall, 3), "round_cpu_s": round(cpu, 3), **split,
        "other_s": round(wall - sum(split.values()), 3),
        "peak_rss_growth_mb": round(peak - base, 1), "fp32_model_mb": round(model_mb, 1),
        "peak_rss_growth_over_model": round((peak - base) / model_mb, 2), "baseline_rss_mb": round(base, 1),
        "upload_bytes_per_client": record.metrics.get("upload_bytes_per_client"), "rounds": cfg["rounds"],
        "torch_threads": torch.get_num_threads(), "securefed": sf.__version__,
    }


def _child(name: str, protocol: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", name, protocol], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{name} / {protocol} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(name: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    secure, plain = _child(name, "secagg+"), _child(name, "plain")
    line: dict[str, Any] = {"config": name, "participants": secure["participants"],
                            "trained_parameters": secure["trained_parameters"]}
    line.update({f"secure_{k}": v for k, v in secure.items() if k.endswith("_s")})
    line.update({f"plain_{k}": v for k, v in plain.items() if k.endswith("_s")})
    line["secure_over_plain"] = round(secure["round_s"] / plain["round_s"], 3)
    line["secure_over_plain_cpu"] = round(secure["round_cpu_s"] / plain["round_cpu_s"], 3)
    for k in ("peak_rss_growth_mb", "peak_rss_growth_over_model", "fp32_model_mb", "baseline_rss_mb"):
        line[k] = secure[k]
    line["plain_peak_rss_growth_mb"] = plain["peak_rss_growth_mb"]
    line.update({"secure_upload_bytes_per_client": secure["upload_bytes_per_client"],
                 "plain_upload_bytes_per_client": plain["upload_bytes_per_client"],
                 "rounds": secure["rounds"], "torch_threads": secure["torch_threads"],
                 "load_average_1min": round(load, 2), "securefed": secure["securefed"]})
    return line


def available() -> list[str]:
    return [n for n in CONFIGS if CONFIGS[n]["kind"] != "lora" or LORA.exists()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="run this configuration (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the smoke configuration mlp2m_n20 only")
    parser.add_argument("--list", action="store_true", help="name the configurations and exit")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "PROTOCOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)), flush=True)
        return
    if args.list:
        print("\n".join(available()))
        return
    names = args.only or (["mlp2m_n20"] if args.quick else [n for n in DEFAULT if n in available()])
    for name in names:
        if name not in available():
            raise SystemExit(f"{name}: {LORA.relative_to(ROOT)} does not exist here")
        print(json.dumps(run(name)), flush=True)


if __name__ == "__main__":
    main()
