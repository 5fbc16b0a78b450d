"""The apps that bench/flower_simulation.py runs on Flower's Simulation Engine (``flwr.simulation.run_simulation``).

Both train the example's model (``examples/flower-app/securefed_app/task.py``: the demo's 64-64-10 MLP, the
example's local SGD) on the same data, and differ only in the aggregation:

- ``securefed_server``/``securefed_client``: the example's apps, securefed's SecAgg+ (default parameters for the
  round's n) with the example's distributed DP;
- ``flower_server``/``flower_client``: Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod`` (FedAvg, no
  DP) on the same graph: ``num_shares`` = securefed's degree + 1, the same reconstruction threshold.

A virtual SuperNode's ``node_config`` holds only ``partition-id`` and ``num-partitions``, so each node here takes
the federation size it expects (securefed's ``num-nodes``) from ``num-partitions``. With hundreds of nodes the
example's Dirichlet split has too few digits (it wants at least 10 per node); each node holds ``SHARD``
examples of the training split instead, consecutive in a fixed (public) permutation, wrapping around.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from securefed_app import task

from securefed.flower import SecureClient, SecureFedAvg

#: Examples per virtual node; local training as in the example's run configuration.
SHARD, EPOCHS, BATCH, LR = 16, 2, 16, 0.1
#: Seconds a phase may take: no node is dropped for being slow on a loaded machine.
TIMEOUT = 3600.0


@functools.lru_cache(maxsize=1)
def _tensors() -> tuple[Any, Any, Any]:
    """(pixels, labels, training indices) of the example's split, read once per process."""
    from sklearn.datasets import load_digits

    pixels, labels = load_digits(return_X_y=True)

    x = torch.tensor(pixels / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    perm = np.random.default_rng(0).permutation(len(y))  # the example's public split
    return x, y, perm[len(y) // 5 :]


def shard(partition: int) -> Any:
    """Virtual node `partition`'s training examples."""
    from torch.utils.data import TensorDataset

    x, y, rest = _tensors()
    idx = rest[(partition * SHARD + np.arange(SHARD)) % len(rest)]
    return TensorDataset(x[idx], y[idx])


def _train(arrays: Any, partition: int) -> tuple[Any, float]:
    net = task.model()
    net.load_state_dict(arrays)
    loss = task.train(net, shard(partition), epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=None)
    return net, loss


def _settings(n: int) -> dict[str, Any]:
    return {"seed": -1, "dp": True, "num-nodes": n}


def _clock(times: list[float]) -> Callable[[], None]:
    """Records now in `times`; the function returned records each later call (a round's end)."""
    times.append(time.perf_counter())
    return lambda: times.append(time.perf_counter())


# --- securefed: the example's apps, with the federation size from num-partitions ---

securefed_client = ClientApp()


def _train_securefed(msg: Message, context: Context) -> Message:
    net, loss = _train(msg.content["arrays"].to_torch_state_dict(), int(context.node_config["partition-id"]))
    metrics = MetricRecord({"train-loss": loss, "num-examples": SHARD})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


def _mine(context: Context) -> dict[str, Any]:
    return _settings(int(context.node_config["num-partitions"]))


SecureClient(
    lambda context: task.protocol(_mine(context)),
    phases=task.PHASES,
    privacy=lambda context: task.privacy(_mine(context)),
    num_nodes=lambda context: _mine(context)["num-nodes"],
).register(securefed_client, _train_securefed)


def securefed_server(n: int, rounds: int, out: dict[str, Any]) -> ServerApp:
    """securefed's SecureFedAvg over `n` nodes for `rounds` rounds; ``out["times"]``: start and each round's end."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = _settings(n)
        times: list[float] = []
        strategy = SecureFedAvg(
            protocol=task.protocol(cfg), privacy=task.privacy(cfg), server_lr=task.SERVER_LR,
            min_train_nodes=n, min_available_nodes=n, phase_timeout=TIMEOUT, train_timeout=TIMEOUT,
        )
        tick = _clock(times)
        result = strategy.start(grid, ArrayRecord(task.model().state_dict()), num_rounds=rounds,
                                train_config=ConfigRecord({"local-epochs": EPOCHS, "batch-size": BATCH, "lr": LR}),
                                evaluate_fn=lambda r, arrays: tick() if r > 0 else None)  # as Flower: also round 0
        out["times"] = times
        out["included"] = [len(r.included) for r in result.rounds]
        out["protocol"] = task.protocol(cfg).describe(n)

    return app


# --- Flower's own SecAgg+: SecAggPlusWorkflow and secaggplus_mod, FedAvg over the same training ---


class _Client(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        net = task.model()
        net.load_state_dict({k: _torch(v) for k, v in zip(net.state_dict(), parameters)})
        net, _ = _train(net.state_dict(), self.partition)
        return [v.detach().numpy() for v in net.state_dict().values()], SHARD, {}


def _torch(a: np.ndarray) -> Any:
    return torch.from_numpy(np.array(a, dtype=np.float32))


flower_client = ClientApp(client_fn=lambda context: _Client(int(context.node_config["partition-id"])).to_client(),
                          mods=[secaggplus_mod])


def flower_server(n: int, rounds: int, num_shares: int, threshold: int, out: dict[str, Any]) -> ServerApp:
    """Flower's DefaultWorkflow with SecAggPlusWorkflow over `n` nodes; ``out["times"]`` as securefed_server's."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        times: list[float] = []
        ticks: list[Callable[[], None]] = []
        initial = [v.detach().numpy() for v in task.model().state_dict().values()]
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters(initial),
                          evaluate_fn=lambda r, params, config: ticks[0]() if r > 0 else None)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        ticks.append(_clock(times))
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                                        timeout=TIMEOUT))(grid, legacy)
        out["times"] = times

    return app
