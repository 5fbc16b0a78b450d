"""Large models: round time and peak memory against d, client memory while masking, threads.

Each configuration runs in its own process (peak RSS is that process's own VmHWM) and
prints one JSON line:

- ``round_<protocol>_n<n>_d<d>``: one simulated round (``simulate_aggregation`` with
  ``LazyInputs``, server view recorded as digests) of n clients whose inputs are float32
  uniform in [-1, 1]: Plain and SecAgg+ with n = 10 at d = 10^5 .. 10^8, CKKS and BFV with
  n = 5 at d = 10^5 .. 10^7. Inputs are made inside the round, one at a time, from
  per-block seeds; their making is timed apart and left out of ``round_wall_s``. The sum is
  checked against the float64 plaintext sum, block by block (``max_abs_error`` <=
  ``error_bound``). ``peak_rss_mb`` is the process's high-water mark, including the
  interpreter, numpy/numba/TenSEAL and the compiled kernels (``baseline_rss_mb``, measured
  after a small warm-up round).
- ``client_memory_d1e7``: a SecAgg+ client with k = 10 neighbours (n = 11) makes its masked
  input at d = 10^7: memory it allocates above its input (tracemalloc peak over ``set_input``
  and the masked-input step) over the size of its fp32 update (target <= 2), and the RSS
  high-water mark above the RSS before the step.
- ``threads_d1e7_k10``: mask expansion of k + 1 = 11 AES-CTR streams over 10^7 uint32
  (``apply_masks``), the whole masked-input step of that client, and the server's unpacking
  of one masked input, with 1 and 2 threads: wall and process CPU seconds (best of 3) and
  the wall-clock speedup; and, independent of the machine's load, the share of the masking
  time spent in Python holding the GIL, with the two-thread speedup it allows (Amdahl).

Timings are wall clock (``*_wall_s``) and CPU seconds of the whole process, all threads
(``*_cpu_s``). Run ``python bench/scale.py`` for every configuration (``--only NAME`` for
some, ``--max-d`` to stop earlier); ``--list`` names them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import procmem  # bench/procmem.py: the script's folder is on sys.path

BLOCK = 1 << 20  # inputs are made block by block from (seed, client, block), so the check can redo them
SEED = 8


def _round_configs() -> dict[str, dict]:
    out = {}
    for protocol, n, ds in (("plain", 10, (5, 6, 7, 8)), ("secagg+", 10, (5, 6, 7, 8)),
                            ("ckks", 5, (5, 6, 7)), ("bfv", 5, (5, 6, 7))):
        for e in ds:
            out[f"round_{protocol}_n{n}_d1e{e}"] = dict(kind="round", protocol=protocol, n=n, d=10**e)
    return out


CONFIGS = {
    **_round_configs(),
    "client_memory_d1e7": dict(kind="client_memory", d=10**7, k=10),
    "threads_d1e7_k10": dict(kind="threads", d=10**7, k=10),
}


def _protocol(name: str):
    import securefed as sf

    return {"plain": lambda: sf.protocols.Plain(), "secagg+": lambda: sf.protocols.SecAggPlus(),
            "ckks": lambda: sf.protocols.CKKS(value_range=1.0),
            "bfv": lambda: sf.protocols.BFV(value_range=1.0)}[name]()


def _block(client: int, b: int, size: int) -> np.ndarray:
    x = np.random.default_rng([SEED, client, b]).random(size, dtype=np.float32)  # benchmark data, not secret
    x *= 2
    x -= 1
    return x


class _Inputs:
    """Makes client i's input block by block and times it."""

    def __init__(self, d: int) -> None:
        self.d, self.seconds, self.cpu_seconds = d, 0.0, 0.0

    def __call__(self, i: int) -> np.ndarray:
        t, c = time.perf_counter(), time.process_time()
        x = np.empty(self.d, dtype=np.float32)
        for b, lo in enumerate(range(0, self.d, BLOCK)):
            x[lo : lo + BLOCK] = _block(i, b, min(BLOCK, self.d - lo))
        self.seconds += time.perf_counter() - t
        self.cpu_seconds += time.process_time() - c
        return x


def _max_error(total: np.ndarray, included: tuple[int, ...], d: int) -> float:
    err = 0.0
    for b, lo in enumerate(range(0, d, BLOCK)):
        size = min(BLOCK, d - lo)
        exact = np.zeros(size)
        for i in included:
            exact += _block(i, b, size)
        err = max(err, float(np.max(np.abs(total[lo : lo + size] - exact))))
    return err


def run_round(protocol: str, n: int, d: int) -> dict:
    import securefed as sf
    from securefed import parallel

    proto = _protocol(protocol)
    sf.simulate_aggregation(proto, [np.zeros(64, dtype=np.float32)] * n, seed=1)  # warm-up: load kernels
    base = procmem.status()["VmRSS"]
    make = _Inputs(d)
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    res = sf.simulate_aggregation(proto, sf.LazyInputs(n, d, make), seed=SEED)
    wall, cpu = time.perf_counter() - t - make.seconds, time.process_time() - c - make.cpu_seconds
    peak = procmem.status()["VmHWM"]
    err = _max_error(res.total, res.included, d)
    bound = proto.error_bound(n)
    upload = statistics.median(size for p, phase, _, size in res.server_view.digests
                               if phase == proto.phases[proto.input_phase_index()])
    return {
        "protocol": protocol, "n": n, "d": d, "threads": parallel.get_threads(),
        "round_wall_s": round(wall, 3), "round_cpu_s": round(cpu, 3), "input_making_s": round(make.seconds, 3),
        "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base, 1), "fp32_update_mb": round(4 * d / 2**20, 1),
        "upload_bytes_per_client": int(upload), "included": len(res.included),
        "max_abs_error": err, "error_bound": bound, "within_bound": err <= bound,
        "load_average_1min": round(load, 2),
    }


def _masking_client(d: int, k: int):
    """A SecAgg+ round of k + 1 clients (complete graph: k neighbours) up to client 0's masked-input request."""
    import securefed as sf
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec

    proto = sf.protocols.SecAggPlus(degree=k)
    spec = RoundSpec(n=k + 1, dim=d, session_id=RandomSource(SEED).token_bytes(32))
    server = proto.server(spec, rng=RandomSource(1))
    clients = [proto.client(spec, i, rng=RandomSource(100 + i)) for i in range(k + 1)]
    for phase in ("advertise_keys", "share_keys"):
        for u, req in server.requests(phase).items():
            server.receive(phase, u, clients[u].handle(phase, req))
        server.finish_phase(phase)
    return proto, spec, server, clients[0], server.requests("masked_input")[0]


def _warm_up_masking(k: int) -> None:
    """Load the kernels of a client's masked-input step (a small one), so that no timing includes them."""
    from securefed import kernels

    kernels.load()  # the compiled loops, as in a long-running process (a fresh one would start in numpy)
    _, _, _, client, request = _masking_client(64, k)
    client.set_input(np.zeros(64, dtype=np.float32))
    client.handle("masked_input", request)


def run_client_memory(d: int, k: int) -> dict:
    _warm_up_masking(k)
    proto, spec, _, client, request = _masking_client(d, k)
    x = _Inputs(d)(0)
    rss_before = procmem.status()["VmRSS"]
    procmem.reset_peak()
    tracemalloc.start()
    t = time.perf_counter()
    client.set_input(x)
    message = client.handle("masked_input", request)
    wall = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = procmem.status()["VmHWM"]
    update = 4 * d
    return {
        "d": d, "neighbours": k, "modulus_bits": proto.encoder.modulus_bits(spec.n), "message_bytes": len(message),
        "fp32_update_bytes": update, "peak_above_input_bytes": peak,
        "peak_above_input_over_update": round(peak / update, 3), "target_ratio": 2.0,
        "meets_target": peak <= 2 * update,
        "rss_peak_above_before_mb": round(rss_peak - rss_before, 1),
        "rss_peak_above_before_over_update": round((rss_peak - rss_before) * 2**20 / update, 3),
        "masked_input_step_wall_s": round(wall, 3),
    }


def _best(f, repeat: int = 3) -> tuple[float, float]:
    """(wall, process CPU) seconds of the fastest of `repeat` runs of f()."""
    runs = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        f()
        runs.append((time.perf_counter() - t, time.process_time() - c))
    return min(runs)


def _held_share(keys: list[bytes]) -> float:
    """Share of a 32 Ki-element chunk's masking time spent in Python (holding the GIL), one thread."""
    from securefed.crypto.masks import Masker

    def per_chunk(chunk: int, reps: int) -> float:
        masker = Masker(np.dtype(np.uint32), keys[:6], keys[6:], 0, chunk)
        part = np.zeros(chunk, dtype=np.uint32)
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for _ in range(reps):
                masker.apply(part)
            best = min(best, (time.thread_time() - t) / reps)
        return best

    return per_chunk(64, 2000) / per_chunk(1 << 15, 50)


def _record(out: dict, name: str, wall: float, cpu: float) -> None:
    out[f"{name}_wall_s"], out[f"{name}_cpu_s"] = round(wall, 4), round(cpu, 4)


def run_threads(d: int, k: int) -> dict:
    from securefed import parallel
    from securefed.crypto.masks import apply_masks
    from securefed.protocols.secagg.packed import UnpackAdder, column_pack

    keys = [bytes([i]) * 16 for i in range(k + 1)]
    buf = np.zeros(d, dtype=np.uint32)
    x = _Inputs(d)(0)
    width = 20
    acc = np.zeros(d, dtype=np.uint32)
    message = column_pack(np.arange(d, dtype=np.uint32) & np.uint32((1 << width) - 1), width)
    adder = UnpackAdder(acc, width)
    out: dict = {"d": d, "neighbours": k, "streams": k + 1}

    def step():
        _, _, _, client, request = _masking_client(d, k)
        client.set_input(x)
        t, c = time.perf_counter(), time.process_time()
        client.handle("masked_input", request)
        return time.perf_counter() - t, time.process_time() - c

    _warm_up_masking(k)
    for threads in (1, 2):
        with parallel.options(threads=threads):
            apply_masks(buf[: 1 << 16], keys[:6], keys[6:])
            wall, cpu = _best(lambda: apply_masks(buf, keys[:6], keys[6:]))
            _record(out, f"mask_expansion_{threads}t", wall, cpu)
            wall, cpu = min(step() for _ in range(3))
            _record(out, f"client_step_{threads}t", wall, cpu)
            wall, cpu = _best(lambda: (adder.add(memoryview(message)), adder.flush()))
            _record(out, f"server_unpack_{threads}t", wall, cpu)
    for part in ("mask_expansion", "client_step", "server_unpack"):
        out[f"{part}_speedup"] = round(out[f"{part}_1t_wall_s"] / out[f"{part}_2t_wall_s"], 3)
    # What the GIL leaves to parallelize, whatever the machine's load: the Python share of a chunk's work
    # (the same calls on 64-element chunks, where AES and numpy do almost nothing) bounds the speedup (Amdahl).
    share = _held_share(keys)
    out["mask_expansion_gil_held_share"] = round(share, 4)
    out["mask_expansion_speedup_bound_2t"] = round(1 / (share + (1 - share) / 2), 3)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


def child(name: str) -> dict:
    cfg = dict(CONFIGS[name])
    kind = cfg.pop("kind")
    t = time.perf_counter()
    result = {"round": run_round, "client_memory": run_client_memory, "threads": run_threads}[kind](**cfg)
    return {"bench": "scale", "config": name, **result, "process_wall_s": round(time.perf_counter() - t, 2),
            "peak_rss_mb_process": round(procmem.status()["VmHWM"], 1), "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(CONFIGS), help="run only these configurations")
    ap.add_argument("--max-d", type=float, default=1e8, help="leave out round configurations above this d")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    ap.add_argument("--list", action="store_true", help="print the configuration names")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return
    names = [n for n in (args.only or CONFIGS) if CONFIGS[n]["kind"] != "round" or CONFIGS[n]["d"] <= args.max_d]
    if args.list:
        print("\n".join(names))
        return
    for name in names:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
            print(lines[-1], flush=True)
        except (subprocess.TimeoutExpired, RuntimeError) as e:
            print(json.dumps({"bench": "scale", "config": name, "error": str(e)[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
