"""SecAgg / SecAgg+ round cost next to the AES-CTR floor it cannot avoid (issue 3's targets).

One JSON line per configuration:

- ``secagg+_n100_d1e6``: SecAggPlus with its default degree, n = 100, d = 10^6, 10% of
  the clients dropping after share_keys (their masks are removed by the server);
- ``secagg_n50_d1e5``: SecAgg (complete graph), n = 50, d = 10^5;
- ``secagg+_n1000_d1e6_memory``: SecAggPlus, n = 1000, d = 10^6: the server's peak memory
  (tracemalloc over the server's calls: what it keeps plus its largest transient, plus the
  clients' masked inputs it holds back to add four at a time).

Every party runs in this process, one after the other; each is timed on its own. In the
timing configurations the server takes each phase's replies back to back once the clients
have answered (as they would come from the network, and without the clients' work evicting
its caches in between; the harness holds those replies, so ``peak_rss_mb`` includes them);
in the memory configuration it takes each reply as soon as it is made. A phase's replies are timed
as one interval in the timing configurations (per call, the clock reads would add ~1 us each).
The floor is measured in the same run: for a client, (k+1) AES-128-CTR expansions of
4d bytes into one preallocated buffer plus (k+1) in-place uint32 adds, k its number
of peers; for the server, the same for the E masks it must remove (E = survivors'
self masks + the pairwise masks of dropped clients). Targets: client masking <= 1.5x
its floor, whole client step (quantize + mask + serialize) <= 3x, server compute <=
2x its floor, server memory within 100 MB of one 4d-byte vector at n = 1000, d = 10^6.
The timing configurations run several rounds (3 and 7), each followed by its floor, and print
the median of every number with the range of the ratios (``*_over_floor_range``): on a shared
VM one round's ratio moves by a third between runs.
The cyclic garbage collector is paused during a timed round and run between rounds, as ``timeit``
does: with every party in one process, a collection is triggered by everyone's allocations (the
server makes ~430 of a round's ~3,700 tracked objects), walks everyone's young objects, and lands
in whichever party allocates next (measured: 0.08 to 0.75 ms inside the server's calls per round,
1.5 to 3.6 ms when it is a second-generation one). On its own, replaying recorded rounds, the
server collects its own objects for 0.08 to 0.1 ms per round on average (40 rounds: 20 collections,
one or two of them second-generation), which the timed rounds here leave out.
``round_total_s`` is the whole simulated round, sequential; ``round_parallel_s`` adds
per phase the slowest client and the server (clients computing in parallel).

Times are CPU seconds of the process, all threads (``time.process_time``: the parties run
one after the other, so this is the CPU of the party measured, on every core it used), so that
a shared machine's scheduling does not inflate them; ``*_wall_s`` fields give wall-clock
seconds. Large vectors are split over ``--threads`` threads (``securefed.parallel``; default 1,
so that a party's CPU seconds compare with the single-thread floor): with more, CPU seconds
add up the threads and wall seconds show what the cores save. ``server_over_floor`` is CPU
over the single-thread floor's CPU; ``server_wall_over_floor`` is wall clock over the floor's
wall clock (measured in the same run). ``client_mask_median_s`` is the client's whole
masked-input step (opening its peers' sealed shares, then encoding, masking and packing in one
pass), so the masking ratio counts more than the masking itself; ``client_quantize_median_s`` is
``set_input`` (checking the input), and the whole step is the two together.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import platform
import resource
import statistics
import time
import tracemalloc

import numpy as np

from securefed.crypto.prg import keystream_into, new_stream
from securefed.crypto.random import RandomSource
from securefed.parallel import configure, get_threads
from securefed.protocols.base import RoundSpec, simulate_aggregation
from securefed.protocols.secagg import PHASES, SecAgg, SecAggPlus
from securefed.protocols.secagg.packed import GROUP, UnpackAdder

CONFIGS = {
    "secagg+_n100_d1e6": dict(protocol="secagg+", n=100, d=10**6, drop=0.1, rounds=3),
    "secagg_n50_d1e5": dict(protocol="secagg", n=50, d=10**5, drop=0.0, rounds=7),
    "secagg+_n1000_d1e6_memory": dict(protocol="secagg+", n=1000, d=10**6, drop=0.0, memory=True),
}
#: Ratios to the floor whose median is reported with its range over the rounds.
_RATIOS = ("client_mask_over_floor", "client_step_over_floor", "server_over_floor", "server_wall_over_floor")


def floor_seconds(streams: int, d: int, repeat: int = 5) -> tuple[float, float]:
    """(CPU, wall) median seconds of `streams` AES-128-CTR expansions of 4d bytes into a preallocated
    buffer, each followed by an in-place uint32 add."""
    buf = np.empty(d, dtype=np.uint32)
    acc = np.zeros(d, dtype=np.uint32)
    cpu, wall = [], []
    for r in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for i in range(streams):
            keystream_into(new_stream(r.to_bytes(8, "big") + i.to_bytes(8, "big")), buf)
            np.add(acc, buf, out=acc)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(cpu), statistics.median(wall)


class _ServerMeter:
    """Times the server's calls and, optionally, its memory (kept + largest transient + the clients'
    messages it holds: `held()` bytes, allocated by the clients, so not in its own allocations)."""

    def __init__(self, memory: bool) -> None:
        self.seconds, self.wall, self.memory, self.kept, self.peak = 0.0, 0.0, memory, 0, 0
        self.held = lambda: 0

    def __call__(self, f, *args, **kwargs):
        if self.memory:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            held = self.held()
        t, c = time.perf_counter(), time.process_time()
        out = f(*args, **kwargs)
        self.seconds += time.process_time() - c
        self.wall += time.perf_counter() - t
        if self.memory:
            now, top = tracemalloc.get_traced_memory()
            self.peak = max(self.peak, self.kept + top - before + max(held, self.held()))
            self.kept += now - before
        return out


def run(name: str, protocol: str, n: int, d: int, drop: float, memory: bool = False, seed: int = 0) -> dict:
    proto = SecAggPlus() if protocol == "secagg+" else SecAgg()
    params = proto.parameters(n)
    rng = RandomSource(seed)
    spec = RoundSpec(n=n, dim=d, session_id=rng.child("session").token_bytes(32))
    dropped = set(range(0, n, round(1 / drop))[: round(drop * n)]) if drop else set()
    data = np.random.default_rng(seed)
    # warm-up: load every compiled kernel (a small round, and the unpacking kernel of this width)
    simulate_aggregation(proto, [np.zeros(64)] * min(n, 40), seed=1)
    warm = UnpackAdder(np.zeros(64, dtype=np.uint32), proto.encoder.modulus_bits(n))
    for _ in range(GROUP):  # (held back, then added GROUP at a time)
        warm.add(memoryview(bytes(warm.size)))

    if memory:
        tracemalloc.start()
    meter = _ServerMeter(memory)
    t_round = time.perf_counter()
    server = meter(proto.server, spec, rng=rng.child("server"))
    # masked inputs the server holds back to add GROUP at a time (the clients' bytes, counted as its own)
    meter.held = lambda: server._adder.held_bytes if getattr(server, "_adder", None) is not None else 0
    recent: collections.deque = collections.deque(maxlen=GROUP)  # so that they are freed outside its calls
    clients = {i: proto.client(spec, i, rng=rng.child(f"client/{i}")) for i in range(n)}
    client_seconds = dict.fromkeys(range(n), 0.0)
    exact = np.zeros(d)  # the plain sum of the included inputs, to check the result
    parallel = 0.0
    upload = 0
    for phase in PHASES:
        server_before = meter.seconds
        requests = meter(server.requests, phase)
        slowest = 0.0
        replies = []
        for u, req in requests.items():
            if phase == "masked_input" and u in dropped:
                continue  # dropped after share_keys
            c = clients[u]
            if phase == "masked_input":
                x = data.uniform(-1.0, 1.0, d).astype(np.float32)  # inputs outside the timing
                exact += x
            t = time.process_time()
            if phase == "masked_input":
                c.set_input(x)
                del x
            reply = c.handle(phase, req)
            spent = time.process_time() - t
            client_seconds[u] += spent
            slowest = max(slowest, spent)
            if phase == "masked_input":
                upload = len(reply)
            if memory:  # stream: the server takes each reply as it comes
                meter(server.receive, phase, u, reply)
                recent.append(reply)
            else:  # as from the network: the server takes the phase's replies back to back
                replies.append((u, reply))
            del reply
        # back to back, so one interval: a clock read per reply (~1 us here) would be counted as server work
        meter(lambda phase=phase, replies=replies: [server.receive(phase, u, reply) for u, reply in replies])
        del replies
        meter(server.finish_phase, phase)
        recent.clear()
        parallel += slowest + meter.seconds - server_before
    total, included = server.result()
    round_total = time.perf_counter() - t_round
    if memory:
        tracemalloc.stop()
    survivors = [i for i in range(n) if i not in dropped]
    t = [clients[i].timings for i in survivors]
    agree = statistics.median(x["share_keys"] for x in t)
    quantize = statistics.median(x["quantize"] for x in t)
    mask = statistics.median(x["mask"] for x in t)
    step = statistics.median(x["quantize"] + x["mask"] for x in t)
    assert included == tuple(survivors)
    assert np.abs(total - exact).max() <= proto.error_bound(n)
    del exact
    graph = proto._round(spec).graph
    server_streams = len(survivors) + sum(
        sum(1 for u in graph.neighbors(v).tolist() if u not in dropped) for v in dropped)
    client_streams = params.degree + 1
    out = {
        "bench": "secagg",
        "config": name,
        "protocol": proto.name,
        "n": n,
        "d": d,
        "degree": params.degree,
        "threshold": params.threshold,
        "modulus_bits": proto.encoder.modulus_bits(n),
        "dropped_after_share_keys": len(dropped),
        "upload_bytes_per_client": upload,
        "round_total_wall_s": round(round_total, 4),
        "round_parallel_s": round(parallel, 4),
        "client_share_keys_median_s": round(agree, 5),
        "client_quantize_median_s": round(quantize, 5),
        "client_mask_median_s": round(mask, 5),
        "client_step_median_s": round(step, 5),
        "client_all_phases_median_s": round(statistics.median(client_seconds[i] for i in survivors), 5),
        "server_compute_s": round(meter.seconds, 4),
        "server_compute_wall_s": round(meter.wall, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": get_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if memory:
        vector = 4 * d / 2**20
        out.update(server_peak_mb=round(meter.peak / 2**20, 1), vector_mb=round(vector, 1),
                   server_peak_over_vector_mb=round(meter.peak / 2**20 - vector, 1),
                   meets_memory_target=meter.peak / 2**20 - vector <= 100)
        return out
    client_floor, client_floor_wall = floor_seconds(client_streams, d)
    server_floor, server_floor_wall = floor_seconds(server_streams, d)
    out.update(
        client_floor_s=round(client_floor, 5), client_floor_wall_s=round(client_floor_wall, 5),
        client_floor_streams=client_streams,
        client_mask_over_floor=round(mask / client_floor, 3),
        client_step_over_floor=round(step / client_floor, 3),
        server_floor_s=round(server_floor, 4), server_floor_wall_s=round(server_floor_wall, 4),
        server_floor_streams=server_streams,
        server_over_floor=round(meter.seconds / server_floor, 3),
        server_wall_over_floor=round(meter.wall / server_floor_wall, 3),
    )
    return _judge(out)


def _timed(name: str, cfg: dict) -> dict:
    """:func:`run` with the cyclic garbage collector paused (see the module's docstring)."""
    gc.collect()
    gc.disable()
    try:
        return run(name, **cfg)
    finally:
        gc.enable()


def combine(lines: list[dict]) -> dict:
    """One line for several rounds of a timing configuration: the median of every number (each
    round's ratios use the floor measured right after it), the range of the ratios, and the
    targets judged on the medians."""
    out = dict(lines[0])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = type(v)(statistics.median(x[k] for x in lines))
    out["rounds"] = len(lines)
    for k in _RATIOS:
        out[k + "_range"] = [min(x[k] for x in lines), max(x[k] for x in lines)]
    return _judge(out)


def _judge(out: dict) -> dict:
    """`out` with the issue's targets judged on its ratios to the floor."""
    out["meets_targets"] = bool(out["client_mask_over_floor"] <= 1.5 and out["client_step_over_floor"] <= 3
                                and out["server_over_floor"] <= 2)
    out["server_meets_target_wall"] = bool(out["server_wall_over_floor"] <= 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(CONFIGS), action="append", help="run only these configurations")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every d by this (smoke runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for model-sized work (default 1: the targets compare one core's work with "
                         "the single-thread floor; on this VM two threads cost ~1.7x the CPU seconds for a "
                         "1.4x wall-clock gain, see bench/scale.py)")
    args = ap.parse_args()
    configure(threads=args.threads)
    for name in args.only or CONFIGS:
        cfg = dict(CONFIGS[name])
        cfg["d"] = max(64, int(cfg["d"] * args.scale))
        rounds = cfg.pop("rounds", 1)
        lines = [_timed(name, cfg) if not cfg.get("memory") else run(name, **cfg) for _ in range(rounds)]
        print(json.dumps(lines[0] if len(lines) == 1 else combine(lines)), flush=True)


if __name__ == "__main__":
    main()
