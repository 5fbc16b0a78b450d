"""securefed's SecAgg+ on Flower's Simulation Engine (Ray), next to Flower's own SecAggPlusWorkflow, in one run.

Runs ``--supernodes`` virtual SuperNodes for ``--rounds`` rounds with each of the two apps in
bench/flower_apps/simulation (the example's model and local training; securefed's SecAgg+ with default
parameters and the example's distributed DP, then Flower's SecAggPlusWorkflow and secaggplus_mod on the same
graph), one after the other in this process, through ``flwr.simulation.run_simulation``. Ray stays on loopback
(Flower's backend config ``init_args`` and the environment below). Measures each round's wall time in the
ServerApp, and the peak memory of this process's whole tree (Ray's GCS, raylet and workers included), sampled
every half second: the sum of RSS (shared pages counted in each process) and of PSS (shared pages split).
Prints one JSON line.
"""

from __future__ import annotations

import os

# Before Ray or Flower is imported: nothing leaves loopback. Ray rewrites a node IP of 127.0.0.1 to the address
# it would use to reach other machines unless it runs as a single-machine cluster
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, on Linux too); its usage stats and Flower's telemetry stay off.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
os.environ.update(LOOPBACK_ENV)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Flower's Ray backend hands this sys.path to its workers (PYTHONPATH), so they import the same apps.
for path in (ROOT / "examples" / "flower-app", ROOT / "bench" / "flower_apps" / "simulation"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def backend_config(cpus: int) -> dict[str, Any]:
    """Flower's Ray backend config: Ray on 127.0.0.1 without its dashboard, one CPU per virtual node's task."""
    return {
        "init_args": {"_node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": cpus,
                      "logging_level": "ERROR", "log_to_driver": True},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }


class TreeMemory:
    """Samples the memory of this process and all its descendants in a thread; ``peak()`` in MB."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.rss, self.pss = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.rss, self.pss = max(self.rss, rss / 2**20), max(self.pss, pss / 2**20)
            self._stop.wait(self.interval)


def simulate(server_app: Any, client_app: Any, n: int, cpus: int, out: dict[str, Any], rounds: int,
             name: str) -> tuple[list[float], TreeMemory, float]:
    """One simulation; returns (each round's seconds, the tree's peak memory, the simulation's wall seconds)."""
    from flwr.simulation import run_simulation

    t = time.perf_counter()
    with TreeMemory() as mem:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_config=backend_config(cpus))  # type: ignore[arg-type]
    wall = time.perf_counter() - t
    times = out.get("times", [])
    if len(times) != rounds + 1:
        raise RuntimeError(f"{name}: the simulation did not finish its {rounds} rounds (see its log above)")
    return [b - a for a, b in zip(times, times[1:])], mem, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use")
    parser.add_argument("--skip-flower", action="store_true", help="only securefed's run")
    args = parser.parse_args()
    n, rounds = args.supernodes, args.rounds

    from bench_sim import apps

    ours: dict[str, Any] = {}
    sf_rounds, sf_mem, sf_wall = simulate(apps.securefed_server(n, rounds, ours), apps.securefed_client, n,
                                          args.cpus, ours, rounds, "securefed")
    degree, threshold = ours["protocol"]["degree"], ours["protocol"]["threshold"]
    result: dict[str, Any] = {
        "bench": "flower_simulation", "supernodes": n, "rounds": rounds,
        "round_seconds": [round(s, 2) for s in sf_rounds],
        "seconds_per_node": round(sum(sf_rounds) / rounds / n, 4),
        "peak_rss_mb": round(sf_mem.rss), "peak_pss_mb": round(sf_mem.pss),
        "included": ours["included"], "degree": degree, "threshold": threshold, "dp": True,
        "simulation_seconds": round(sf_wall, 1),
    }
    if not args.skip_flower:
        # Flower's run can take much longer: keep securefed's figures if it is stopped.
        print(f"securefed done: {json.dumps(result)}", file=sys.stderr, flush=True)
        theirs: dict[str, Any] = {}
        fl_rounds, fl_mem, fl_wall = simulate(apps.flower_server(n, rounds, degree + 1, threshold, theirs),
                                              apps.flower_client, n, args.cpus, theirs, rounds, "flower")
        result.update({
            "flower_secaggplus_round_seconds": [round(s, 2) for s in fl_rounds],
            "flower_seconds_per_node": round(sum(fl_rounds) / rounds / n, 4),
            "flower_peak_rss_mb": round(fl_mem.rss), "flower_peak_pss_mb": round(fl_mem.pss),
            "flower_num_shares": degree + 1, "flower_simulation_seconds": round(fl_wall, 1),
            "time_ratio_securefed_over_flower": round(sum(sf_rounds) / sum(fl_rounds), 3),
        })
    result.update({"engine": "flwr.simulation.run_simulation (Ray), 1 CPU per virtual node's task",
                   "ray_cpus": args.cpus, "cpus": os.cpu_count(), "python": platform.python_version()})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
