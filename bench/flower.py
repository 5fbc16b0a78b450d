"""securefed's SecAgg+ on a Flower deployment, next to a plain FedAvg round and Flower's own SecAggPlusWorkflow.

Starts a SuperLink and `--nodes` SuperNodes on 127.0.0.1 (TLS, node authentication), then
runs, on the same nodes, the same d-dimensional updates and the same deployment:
`--rounds` rounds of securefed's GridAggregator with SecAggPlus (bench/flower_apps/securefed;
with `--ahead 1` each round carries the next round's setup), `--rounds` rounds of plain Flower
FedAvg (DefaultWorkflow, no secure aggregation: bench/flower_apps/flwr_fedavg), and one round
of Flower's DefaultWorkflow with SecAggPlusWorkflow and secaggplus_mod
(bench/flower_apps/flwr_secaggplus) on the same graph (neighbours = num_shares - 1).
Steady-state round seconds are the mean over the rounds after the first. Measures in each
ServerApp the rounds' wall time and per node the serialized content bytes sent and received
(the same counting grid for all), and for securefed and FedAvg where a message's seconds go
(queueing and polling, ClientApp start, the handler, the way back; the ClientApp process's CPU
seconds by the handler's end; for securefed deflate+inflate of one message).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import securefed
from securefed.flower.loopback import LoopbackFederation

APPS = Path(__file__).resolve().parent / "flower_apps"


def run_app(fed: LoopbackFederation, app: str, config: dict, out: Path, timeout: float) -> tuple[dict, str]:
    """The app's result file and the run's log."""
    run_id = fed.run(APPS / app, {**config, "out": str(out)})
    status = fed.wait(run_id, timeout=timeout)
    if status["status"] != "finished:completed" or not out.exists():
        raise RuntimeError(f"{app}: run {status['status']}:\n{fed.run_log(run_id)[-4000:]}")
    return json.loads(out.read_text()), fed.run_log(run_id)


def _steady(seconds: list[float]) -> float:
    """Mean seconds of the rounds after the first (the first pays the full setup); the only one if one."""
    later = seconds[1:] or seconds
    return sum(later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--dim", type=int, default=10**6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ahead", type=int, choices=(0, 1), default=1,
                        help="1: each securefed round carries the next round's setup (two messages per round)")
    parser.add_argument("--timeout", type=float, default=600.0)
    # Flower's default: LoopbackFederation's 0.2 s (quicker tests) costs 0.54 cores of polling at 20 nodes on 2 cores.
    parser.add_argument("--task-poll", type=float, default=1.0,
                        help="seconds between a SuperExec's looks for new tasks (FLWR_SUPEREXEC_TASK_POLL_INTERVAL; "
                             "default: Flower's, 1.0)")
    args = parser.parse_args()
    n, dim = args.nodes, args.dim
    degree = n - 1 if n % 2 else n - 2  # SecAgg+'s degree is even; for n = 5 the complete graph
    # The nodes' protocol setting (SecAgg+'s degree) is their own: node_config, with the server's copy in run_config.
    nodes = [{"partition-id": i, "num-partitions": n, "degree": degree} for i in range(n)]
    # Every message starts a fresh ClientApp process; give securefed the bytecode an installed wheel has
    # (with PYTHONDONTWRITEBYTECODE set, an editable checkout would be compiled again in each of them).
    compileall.compile_dir(str(Path(securefed.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory() as tmp, LoopbackFederation(Path(tmp) / "fed", num_nodes=n,
                                                                  node_configs=nodes,
                                                                  task_poll_interval=args.task_poll) as fed:
        t = time.perf_counter()
        ours, _ = run_app(fed, "securefed", {"num-nodes": n, "dim": dim, "degree": degree, "timeout": args.timeout,
                                          "rounds": args.rounds, "ahead": args.ahead},
                       Path(tmp) / "securefed.json", 3 * args.rounds * args.timeout)
        plain, _ = run_app(fed, "flwr_fedavg", {"num-nodes": n, "dim": dim, "rounds": args.rounds,
                                             "timeout": args.timeout},
                        Path(tmp) / "fedavg.json", 3 * args.rounds * args.timeout)
        threshold = ours["protocol"]["threshold"]
        flwr, flwr_log = run_app(fed, "flwr_secaggplus", {"num-nodes": n, "dim": dim, "num-shares": degree + 1,
                                                "reconstruction-threshold": threshold, "timeout": args.timeout},
                       Path(tmp) / "flwr.json", 3 * args.timeout)
        total = time.perf_counter() - t
    steady = _steady(ours["round_seconds"])
    fedavg = _steady(plain["round_seconds"])
    messages = ours["messages_per_node"]
    if flwr["upload_bytes_per_node"] < 4 * dim:  # each node uploads its masked fp32-sized vector in a full round
        raise RuntimeError(f"Flower's SecAggPlusWorkflow round did not aggregate (uploads of "
                           f"{flwr['upload_bytes_per_node']:.0f} bytes per node):\n{flwr_log[-4000:]}")
    print(json.dumps({
        "bench": "flower", "n": n, "d": dim, "neighbours": degree, "threshold": threshold,
        "deployment": "SuperLink + SuperNodes on 127.0.0.1, TLS, node authentication",
        "securefed_round_seconds": round(steady, 3), "fedavg_round_seconds": round(fedavg, 3),
        "flower_secaggplus_round_seconds": round(flwr["round_seconds"], 3),
        # Flower messages each node received per round in steady state (the first round pays the full setup).
        "client_messages_per_round": _steady(ours["messages_per_round"]),
        "rounds": args.rounds, "ahead": bool(args.ahead), "task_poll_seconds": args.task_poll,
        "securefed_secaggplus": {
            "round_seconds": [round(x, 3) for x in ours["round_seconds"]],
            "phase_seconds": ours["phase_seconds"],
            "messages_per_node": messages, "messages_per_round": ours["messages_per_round"],
            "seconds_per_message": ours["breakdown"],
            "upload_bytes_per_node": ours["upload_bytes_per_node"],
            "download_bytes_per_node": ours["download_bytes_per_node"],
            "protocol_upload_bytes_per_node": ours["protocol_upload_bytes_per_node"],
            "value_bits": ours["protocol"]["encoder"].get("value_bits"),
            "modulus_bits": ours["protocol"]["modulus_bits"],
            "max_abs_error": ours["max_abs_error"], "error_bound": ours["error_bound"],
        },
        "flwr_fedavg": {
            "round_seconds": [round(x, 3) for x in plain["round_seconds"]],
            "seconds_per_message": plain["breakdown"],
            "upload_bytes_per_node": plain["upload_bytes_per_node"],
            "download_bytes_per_node": plain["download_bytes_per_node"],
        },
        "flower_secaggplus_workflow": {
            "round_seconds": round(flwr["round_seconds"], 3),
            "upload_bytes_per_node": flwr["upload_bytes_per_node"],
            "download_bytes_per_node": flwr["download_bytes_per_node"],
            "num_shares": degree + 1, "reconstruction_threshold": threshold,
        },
        "time_ratio_securefed_over_flower": round(steady / flwr["round_seconds"], 3),
        "time_ratio_securefed_over_fedavg": round(steady / fedavg, 3),
        "upload_ratio_securefed_over_flower": round(ours["upload_bytes_per_node"] / flwr["upload_bytes_per_node"], 3),
        "wall_seconds": round(total, 1), "cpus": os.cpu_count(), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
