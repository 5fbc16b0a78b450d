"""securefed's SecAgg+ on a Flower deployment, next to Flower's own SecAggPlusWorkflow, in the same run.

Starts a SuperLink and `--nodes` SuperNodes on 127.0.0.1 (TLS, node authentication), then
runs one aggregation round of d-dimensional updates with each: securefed's GridAggregator
with SecAggPlus (bench/flower_apps/securefed) and Flower's DefaultWorkflow with
SecAggPlusWorkflow and secaggplus_mod (bench/flower_apps/flwr_secaggplus), on the same
nodes, the same updates and the same graph (neighbours = num_shares - 1). Measures in each
ServerApp: the round's wall time, and per node the serialized content bytes sent and received
(the same counting grid for both). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from securefed.flower.loopback import LoopbackFederation

APPS = Path(__file__).resolve().parent / "flower_apps"


def run_app(fed: LoopbackFederation, app: str, config: dict, out: Path, timeout: float) -> dict:
    run_id = fed.run(APPS / app, {**config, "out": str(out)})
    status = fed.wait(run_id, timeout=timeout)
    if status["status"] != "finished:completed" or not out.exists():
        raise RuntimeError(f"{app}: run {status['status']}:\n{fed.run_log(run_id)[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--dim", type=int, default=10**6)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    n, dim = args.nodes, args.dim
    degree = n - 1 if n % 2 else n - 2  # SecAgg+'s degree is even; for n = 5 the complete graph
    # The nodes' protocol setting (SecAgg+'s degree) is their own: node_config, with the server's copy in run_config.
    nodes = [{"partition-id": i, "num-partitions": n, "degree": degree} for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp, LoopbackFederation(Path(tmp) / "fed", num_nodes=n,
                                                                  node_configs=nodes) as fed:
        t = time.perf_counter()
        ours = run_app(fed, "securefed", {"num-nodes": n, "dim": dim, "degree": degree, "timeout": args.timeout},
                       Path(tmp) / "securefed.json", 3 * args.timeout)
        threshold = ours["protocol"]["threshold"]
        flwr = run_app(fed, "flwr_secaggplus", {"num-nodes": n, "dim": dim, "num-shares": degree + 1,
                                                "reconstruction-threshold": threshold, "timeout": args.timeout},
                       Path(tmp) / "flwr.json", 3 * args.timeout)
        total = time.perf_counter() - t
    print(json.dumps({
        "bench": "flower", "n": n, "d": dim, "neighbours": degree, "threshold": threshold,
        "deployment": "SuperLink + SuperNodes on 127.0.0.1, TLS, node authentication",
        "securefed_secaggplus": {
            "round_seconds": round(ours["round_seconds"], 3),
            "phase_seconds": {k: round(v, 3) for k, v in ours["phase_seconds"].items()},
            "upload_bytes_per_node": ours["upload_bytes_per_node"],
            "download_bytes_per_node": ours["download_bytes_per_node"],
            "protocol_upload_bytes_per_node": ours["protocol_upload_bytes_per_node"],
            "value_bits": ours["protocol"]["encoder"].get("value_bits"),
            "modulus_bits": ours["protocol"]["modulus_bits"],
            "max_abs_error": ours["max_abs_error"], "error_bound": ours["error_bound"],
        },
        "flower_secaggplus_workflow": {
            "round_seconds": round(flwr["round_seconds"], 3),
            "upload_bytes_per_node": flwr["upload_bytes_per_node"],
            "download_bytes_per_node": flwr["download_bytes_per_node"],
            "num_shares": degree + 1, "reconstruction_threshold": threshold,
        },
        "time_ratio_securefed_over_flower": round(ours["round_seconds"] / flwr["round_seconds"], 3),
        "upload_ratio_securefed_over_flower": round(ours["upload_bytes_per_node"] / flwr["upload_bytes_per_node"], 3),
        "wall_seconds": round(total, 1), "cpus": os.cpu_count(), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
