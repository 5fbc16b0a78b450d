"""A real Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes, with TLS and node authentication.

For integration tests and benchmarks (and users' own CI): certificates and node keys
are generated into a fresh directory (``cryptography``), ``FLWR_HOME`` is private to
the federation, every process binds to 127.0.0.1 only, and :meth:`LoopbackFederation.close`
kills every process the federation started, found by PID (its own children and any
descendant carrying the federation's marker in its environment), even after a failure.

Flower's own commands do the work: ``flower-superlink``, ``flower-supernode``,
``flwr supernode register``, ``flwr run``, ``flwr list``, ``flwr log``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from securefed.errors import ConfigurationError

__all__ = ["LoopbackFederation", "free_ports"]

_HOST = "127.0.0.1"
_MARKER = "SECUREFED_LOOPBACK"


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (held open together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_tls(d: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 and localhost signed by it (P-384, one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: str, key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (builder("securefed loopback CA", "securefed loopback CA", ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (builder(_HOST, "securefed loopback CA", key)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(_HOST)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))


def write_node_key(path: Path) -> Path:
    """A SuperNode authentication key pair (P-384, OpenSSH format) at `path` and `path`.pub; returns the .pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pub


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _marked(token: str) -> set[int]:
    """PIDs whose environment carries this federation's marker (only processes it started do)."""
    needle = f"{_MARKER}={token}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                found.add(int(entry.name))
    return found


class LoopbackFederation:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1 under `workdir` (created; must be empty or absent).

    - ``node_configs``: the ``--node-config`` of each node (default ``partition-id=i
      num-partitions=N``);
    - ``tls``/``auth``: TLS everywhere and node authentication (keys registered with
      ``flwr supernode register``); auth needs TLS;
    - ``task_poll_interval``: how often each SuperExec looks for new tasks (Flower's
      default is 1 s; lower starts every message's ClientApp sooner, but the polling costs
      CPU: 20 idle nodes on one machine took 0.54 cores at 0.2 s, 0.17 at 1 s).

    Use as a context manager, or call :meth:`start` and :meth:`close`. Raises
    ConfigurationError when Flower is missing or a process does not come up in time.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        num_nodes: int,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        tls: bool = True,
        auth: bool = True,
        task_poll_interval: float = 0.2,
        startup_timeout: float = 60.0,
    ) -> None:
        if auth and not tls:
            raise ConfigurationError("node authentication needs TLS")
        self.dir = Path(workdir)
        self.num_nodes = num_nodes
        self.node_configs = list(node_configs) if node_configs is not None else [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        if len(self.node_configs) != num_nodes:
            raise ConfigurationError(f"{len(self.node_configs)} node configs for {num_nodes} nodes")
        self.tls, self.auth = tls, auth
        self.startup_timeout = startup_timeout
        self._bin = Path(sys.executable).parent
        self._token = secrets.token_hex(8)
        self.env = {
            **os.environ, "FLWR_HOME": str(self.dir / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(task_poll_interval),
            "PATH": f"{self._bin}{os.pathsep}{os.environ.get('PATH', '')}", _MARKER: self._token,
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.conn = "loopback"
        #: Node id of each node (by index), as registered (auth) or as reported by the SuperNode.
        self.node_ids: dict[int, int] = {}

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        with log:
            proc = subprocess.Popen([str(self._bin / argv[0]), *argv[1:]], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.dir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` command with this federation's ``FLWR_HOME``."""
        res = subprocess.run([str(self._bin / "flwr"), *args], capture_output=True, text=True, env=self.env,
                             cwd=self.dir, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise ConfigurationError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def _json(self, *args: str, timeout: float = 60.0) -> Any:
        out = self.flwr(*args, "--format", "json", timeout=timeout).stdout
        return json.loads(out[out.index("{"):])

    def log(self, name: str) -> str:
        """What process `name` (``superlink``, ``node-0`` ...) printed so far."""
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> LoopbackFederation:
        """Start the SuperLink and the SuperNodes; returns when every node is online."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if any(self.dir.iterdir()):
            raise ConfigurationError(f"{self.dir} is not empty")
        home = self.dir / "flwr-home"
        home.mkdir()
        tls_args: list[str] = []
        if self.tls:
            _write_tls(self.dir)
            tls_args = ["--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key", "--ssl-ca-certfile", "ca.crt"]
        self.port, *node_ports = free_ports(1 + self.num_nodes)
        conn: dict[str, str | bool] = {"address": f"{_HOST}:{self.port}"}
        conn.update({"root-certificates": str(self.dir / "ca.crt")} if self.tls else {"insecure": True})
        lines = [f'[superlink]\ndefault = "{self.conn}"\n\n[superlink.{self.conn}]']
        lines += [f"{k} = {json.dumps(v)}" for k, v in conn.items()]
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        self._spawn("superlink", ["flower-superlink", "--host", _HOST, "--port", str(self.port),
                                  "--disable-runtime-dependency-installation",
                                  *(tls_args or ["--insecure"]), *(["--enable-supernode-auth"] if self.auth else [])])
        self._wait_port(self.port, "superlink")
        if self.auth:  # register every key first, concurrently (each `flwr` call costs a second of start-up)
            pubs = [write_node_key(self.dir / f"node-{i}.key") for i in range(self.num_nodes)]
            calls = [subprocess.Popen([str(self._bin / "flwr"), "supernode", "register", str(pub), self.conn,
                                       "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=self.env, cwd=self.dir, text=True) for pub in pubs]
            for i, call in enumerate(calls):
                out, err = call.communicate(timeout=self.startup_timeout)
                if call.returncode != 0:
                    raise ConfigurationError(f"flwr supernode register failed:\n{out}\n{err}")
                self.node_ids[i] = int(json.loads(out[out.index("{"):])["node-id"])
        for i, port in enumerate(node_ports):
            self.start_node(i, port=port, register=False, key_ready=self.auth)
        self.wait_online(self.num_nodes)
        return self

    def start_node(self, index: int, *, port: int | None = None, register: bool = True,
                   node_config: Mapping[str, Any] | None = None, name: str | None = None,
                   key_ready: bool = False) -> subprocess.Popen[bytes]:
        """Start SuperNode `index` (with auth: a fresh key, registered unless ``register=False``;
        ``key_ready``: the key file ``NAME.key`` exists already)."""
        name = name or f"node-{index}"
        cfg = node_config if node_config is not None else self.node_configs[index]
        argv = ["flower-supernode", "--superlink", f"{_HOST}:{self.port}", "--host", _HOST,
                "--port", str(port or free_ports(1)[0]),
                "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())]
        argv += ["--root-certificates", "ca.crt"] if self.tls else ["--insecure"]
        if self.auth:
            pub = self.dir / f"{name}.key.pub" if key_ready else write_node_key(self.dir / f"{name}.key")
            argv += ["--auth-supernode-private-key", f"{name}.key"]
            if register:
                self.node_ids[index] = int(self._json("supernode", "register", str(pub), self.conn)["node-id"])
        return self._spawn(name, argv)

    def _wait_port(self, port: int, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise ConfigurationError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection((_HOST, port), timeout=1):
                return
            time.sleep(0.2)
        raise ConfigurationError(f"{name} did not listen on {_HOST}:{port} within {self.startup_timeout:.0f} s")

    def online_nodes(self) -> list[int]:
        """Node ids the SuperLink reports online."""
        nodes = self._json("supernode", "list", self.conn)["nodes"]
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_online(self, count: int) -> list[int]:
        """Wait until `count` nodes are online; returns their ids."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            nodes = self.online_nodes()
            if len(nodes) >= count:
                if not self.auth:  # without registration, learn each node's id from its log
                    for i in range(self.num_nodes):
                        if m := re.search(r"SuperNode ID: (\d+)", self.log(f"node-{i}")):
                            self.node_ids[i] = int(m.group(1))
                return nodes
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"only {len(nodes)} of {count} nodes online after {self.startup_timeout:.0f} s")
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL process `name` and its process group (a crash: no clean shutdown)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    # -- runs -----------------------------------------------------------------------------

    def run(self, app: str | os.PathLike[str], run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run`` the app directory `app` with `run_config` overrides; returns the run id."""
        args = ["run", str(Path(app).resolve()), self.conn]
        if run_config:
            import tomli_w

            path = self.dir / f"run-config-{secrets.token_hex(4)}.toml"
            path.write_text(tomli_w.dumps(dict(run_config)))
            args += ["--run-config", str(path)]
        res = self._json(*args, timeout=120.0)
        if not res.get("success"):
            raise ConfigurationError(f"flwr run failed: {res}")
        return int(res["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's entry from ``flwr list`` (``status`` is e.g. ``finished:completed``)."""
        runs = self._json("list", self.conn, "--run-id", str(run_id))["runs"]
        return dict(runs[0])

    def wait(self, run_id: int, timeout: float, poll: float = 2.0) -> dict[str, Any]:
        """Wait until the run finishes (``flwr run`` exits 0 even when the ServerApp fails: check ``status``)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(run_id)
            if str(st["status"]).startswith("finished"):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {st['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def run_log(self, run_id: int) -> str:
        """The run's logs (``flwr log --show``): the ServerApp's output."""
        return self.flwr("log", str(run_id), self.conn, "--show", timeout=60.0, check=False).stdout

    # -- inspection and cleanup -------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every live process this federation started: its children, their descendants, and marked ones."""
        tree = _children()
        found: set[int] = set()
        stack = [p.pid for p in self.procs.values() if p.poll() is None]
        while stack:
            pid = stack.pop()
            if pid not in found:
                found.add(pid)
                stack.extend(tree.get(pid, ()))
        return found | _marked(self._token)

    def listening(self) -> set[tuple[str, int]]:
        """The (address, port) of every TCP socket the federation's processes listen on."""
        inodes = set()
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if (target := os.readlink(fd.path)).startswith("socket:["):
                            inodes.add(target[8:-1])
        out = set()
        for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        out.add((_address(fields[1], family), int(fields[1].rsplit(":", 1)[1], 16)))
        return out

    def close(self) -> None:
        """SIGKILL every process the federation started (by PID) and reap its children."""
        for _ in range(3):  # a dying parent may still spawn; look again
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            time.sleep(0.2)

    def __enter__(self) -> LoopbackFederation:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(hex_addr: str, family: int) -> str:
    host = hex_addr.rsplit(":", 1)[0]
    raw = bytes.fromhex(host)
    if family == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6 stores the address as four little-endian 32-bit words.
    return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
