"""Flower's Simulation Engine (Ray): securefed's SecAgg+ with distributed DP over virtual SuperNodes, loopback only.

Two runs, each watched while it runs: every listening socket of its whole process tree (Ray's GCS, raylet,
agents and workers; Flower's local SuperLink and its simulation process) must be bound to 127.0.0.1 or ::1.

- ``bench/flower_simulation.py --supernodes 20 --rounds 1``: ``flwr.simulation.run_simulation`` with Flower's
  backend config (``init_args``), the example's model and protocol, 20 virtual SuperNodes;
- ``flwr run examples/flower-app local-simulation``: the example's README command, with the connection it ships
  (``examples/flower-app/local-simulation.toml``) and the environment its README exports.

If Ray is not installed (``securefed[simulation]``; Ray has no wheel for Python 3.10 in Flower's pin) or
cannot start here, the tests skip and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower-app"
BENCH = ROOT / "bench" / "flower_simulation.py"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: What the README exports (and bench/flower_simulation.py sets): Ray on loopback, no usage stats, no telemetry.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def is_loopback(host: str) -> bool:
    """127.0.0.1 or ::1 (an IPv4-mapped ::ffff:127.0.0.1 is 127.0.0.1); a wildcard or any other address is not."""
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) in ("127.0.0.1", "::1")


def test_is_loopback_refuses_wildcards_and_other_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "192.0.2.2", "127.0.0.2", "::ffff:192.0.2.2", "10.0.0.1"):
        assert not is_loopback(host), host


def tree(root: int) -> set[int]:
    """`root` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found and os.path.exists(f"/proc/{pid}"):
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def _hex_address(field: str, family: int) -> str:
    raw = bytes.fromhex(field.split(":")[0])
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids: set[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket listening, and every unconnected UDP socket, owned by `pids`."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the simulation extra
        psutil = None
    out = set()
    if psutil is not None:
        for c in psutil.net_connections(kind="inet"):
            if c.pid in pids and c.laddr and (c.status == psutil.CONN_LISTEN or
                                              (c.type == socket.SOCK_DGRAM and not c.raddr)):
                out.add((c.laddr.ip, c.laddr.port, c.pid))
        return out
    owner = {}  # socket inode -> pid
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if (target := os.readlink(fd.path)).startswith("socket:["):
                        owner[target[8:-1]] = pid
    for name, family in (("tcp", 4), ("tcp6", 6), ("udp", 4), ("udp6", 6)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                f = line.split()
                bound = f[3] == "0A" if name.startswith("tcp") else f[2].endswith(":0000")  # LISTEN; no peer
                if bound and f[9] in owner:
                    out.add((_hex_address(f[1], family), int(f[1].rsplit(":", 1)[1], 16), owner[f[9]]))
    return out


def kill_tree(root: int) -> None:
    """SIGKILL `root` and its descendants, by PID."""
    for pid in tree(root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, **LOOPBACK_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@pytest.fixture(scope="module")
def ray_starts():
    """Skip, saying why, when Ray is missing or cannot start here (the same loopback settings as the runs)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install 'securefed[simulation]' (flwr[simulation]; Flower pins Ray "
                    "for Python >= 3.11 only)")
    probe = ("import ray; ray.init(_node_ip_address='127.0.0.1', include_dashboard=False, num_cpus=1, "
             "logging_level='ERROR'); ray.shutdown()")
    try:
        res = subprocess.run([sys.executable, "-c", probe], env=env(), capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("Ray did not start within 180 s in this sandbox")
    if res.returncode != 0:
        pytest.skip(f"Ray cannot start in this sandbox (exit {res.returncode}): {res.stderr.strip()[-600:]}")


def watch(root: int, done, interval: float = 0.5) -> set[tuple[str, int, int]]:
    """Sockets listening anywhere in `root`'s process tree, sampled until ``done()``."""
    seen: set[tuple[str, int, int]] = set()
    while not done():
        seen |= listening(tree(root))
        time.sleep(interval)
    return seen


def test_twenty_virtual_supernodes_one_round_loopback_only(ray_starts):
    proc = subprocess.Popen([sys.executable, str(BENCH), "--supernodes", "20", "--rounds", "1", "--skip-flower",
                             "--cpus", "2"], env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen = watch(proc.pid, lambda: proc.poll() is not None)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["supernodes"] == 20 and result["included"] == [20] and len(result["round_seconds"]) == 1
    assert result["peak_rss_mb"] > 0
    # Ray's GCS and raylet listen while the simulation runs: the check saw the simulation, not an empty tree.
    assert len(seen) >= 2, seen
    assert not [s for s in seen if not is_loopback(s[0])], seen


def flwr(args: list[str], environ: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=environ, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_flwr_run_local_simulation_completes_on_loopback(ray_starts, tmp_path):
    from securefed.flower.loopback import free_ports

    home = tmp_path / "flwr-home"
    home.mkdir()
    # A fresh Flower configuration (what the first flwr command writes) plus the connection the README adds.
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
                                      + (APP / "local-simulation.toml").read_text())
    http, control = free_ports(2)
    environ = env(FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
                  FLWR_LOCAL_CONTROL_API_PORT=str(control), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    app = tmp_path / "flower-app"  # flwr run reads the app; a copy keeps the checkout as it is
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    superlink = None
    try:
        # N = 6 virtual SuperNodes, not the example's 5: each takes num-nodes from its num-partitions.
        res = flwr(["run", str(app), "local-simulation", "--format", "json", "--run-config",
                    "num-server-rounds=1 num-nodes=6 min-nodes=6", "--federation-config", "num-supernodes=6"], environ)
        assert res.returncode == 0, res.stdout + res.stderr
        run_id = json.loads(res.stdout[res.stdout.index("{"):])["run-id"]
        # flwr run starts Flower's local SuperLink detached: find it by the port it serves on.
        psutil = pytest.importorskip("psutil", reason="finding Flower's detached local SuperLink needs psutil")
        superlink = next(c.pid for c in psutil.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == http)
        status: dict = {}
        asked = [0.0]

        def done() -> bool:
            if time.monotonic() - asked[0] < 5:  # flwr list is a process of its own: ask every 5 s
                return False
            asked[0] = time.monotonic()
            runs = json.loads(flwr(["list", "local-simulation", "--run-id", run_id, "--format", "json"],
                                   environ).stdout)["runs"]
            status.update(runs[0])
            return status["status"].startswith("finished")

        deadline = time.monotonic() + 500
        seen = watch(superlink, lambda: done() or time.monotonic() > deadline)
        assert status.get("status") == "finished:completed", status
        log = flwr(["log", run_id, "local-simulation", "--show"], environ).stdout
        assert "round 1: 6 of 6 nodes included" in log, log[-3000:]
        # The SuperLink's API, and Ray's GCS and raylet under its simulation process, were seen listening.
        assert {p for _, p, _ in seen} >= {http} and len(seen) >= 3, seen
        assert not [s for s in seen if not is_loopback(s[0])], seen
    finally:
        if superlink is not None:
            kill_tree(superlink)
