"""Verification time of a 1,000-round audit log (target: under 5 s).

Writes a log of `--rounds` rounds over `--clients` participants (one dropout per round,
a Gaussian DP event per round, so the verifier recomputes epsilon every round), then
times ``securefed.audit.verify`` on it, best of `--repeat` (wall clock, and CPU time of this
process, which a busy machine distorts less). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import securefed as sf
from securefed.audit import AuditWriter, verify
from securefed.audit.keys import key_paths


def write(path: Path, rounds: int, clients: int, protocol: sf.protocols.AggregationProtocol) -> float:
    from securefed.privacy.accountant import Accountant
    from securefed.privacy.events import GaussianEvent

    acc = Accountant("rdp")
    xs = [np.full(16, i / clients) for i in range(clients)]  # inside every protocol's default range
    t = time.perf_counter()
    with AuditWriter(path) as w, w.session(config={"bench": "audit"}, privacy={"accountant": "rdp", "delta": 1e-5}):
        for r in range(1, rounds + 1):
            res = sf.simulate_aggregation(protocol, xs, dropouts={r % clients: protocol.phases[0]}, seed=r,
                                          record="digest", round_index=r)
            event = GaussianEvent(noise_multiplier=1.0, sampling_rate=0.1, round=r, num_clients=len(res.included))
            acc.record(event)
            w.round(r, protocol=protocol, result=res, dp_events=[event.to_dict()], epsilon=acc.epsilon(1e-5),
                    metrics={"loss": 1.0 / r, "eval_accuracy": 0.9})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--protocol", default="plain", help="a name in securefed.protocols.REGISTRY (default plain)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    protocol = sf.protocols.REGISTRY[args.protocol]()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        write_s = write(path, args.rounds, args.clients, protocol)
        times, cpu, res = [], [], None
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            res = verify(path, key_paths(path)[1])
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        assert res is not None and res.ok and res.rounds == args.rounds, res and res.summary()
        size = path.stat().st_size
    print(json.dumps({
        "bench": "audit", "rounds": args.rounds, "clients": args.clients, "protocol": protocol.name,
        "entries": res.entries, "log_bytes": size, "epsilon": round(res.epsilon or 0.0, 6),
        "write_s": round(write_s, 3), "verify_s": round(min(times), 3), "verify_cpu_s": round(min(cpu), 3),
        "verify_ms_per_round": round(1000 * min(times) / args.rounds, 3), "target_s": 5.0,
        "meets_target": min(times) < 5.0, "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
