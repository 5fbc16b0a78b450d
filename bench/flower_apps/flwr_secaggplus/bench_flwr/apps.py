"""One round of Flower's own SecAgg+ (SecAggPlusWorkflow, secaggplus_mod) on d-dimensional updates."""

import json
import time

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from securefed.flower.testing import CountingGrid


def update(partition: int, dim: int) -> np.ndarray:
    """The same updates as the securefed run."""
    return np.random.default_rng(partition).uniform(-0.5, 0.5, dim).astype(np.float32)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, dim = int(cfg["num-nodes"]), int(cfg["dim"])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=int(cfg["num-shares"]), reconstruction_threshold=int(cfg["reconstruction-threshold"]),
        timeout=float(cfg["timeout"])))
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.5)
    counting = CountingGrid(grid)
    t0 = time.perf_counter()
    workflow(counting, legacy)
    seconds = time.perf_counter() - t0
    nodes = sorted(counting.up)
    result = {
        "round_seconds": seconds,
        "upload_bytes_per_node": float(np.mean([counting.up[v] for v in nodes])),
        "download_bytes_per_node": float(np.mean([counting.down[v] for v in nodes])),
        "nodes": len(nodes),
    }
    with open(str(cfg["out"]), "w") as f:
        json.dump(result, f)


class _Client(NumPyClient):
    def __init__(self, partition: int, dim: int) -> None:
        self.partition, self.dim = partition, dim

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        return [parameters[0] + update(self.partition, self.dim)], 1, {}


def _client_fn(context: Context):  # type: ignore[no-untyped-def]
    return _Client(int(context.node_config["partition-id"]), int(context.run_config["dim"])).to_client()


client = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
