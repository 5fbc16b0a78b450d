"""CKKS and BFV aggregation at d = 10^6, n = 10, next to the same operations done with raw TenSEAL calls.

Prints one JSON line per scheme. For securefed and for raw TenSEAL (same ring, moduli,
scale or plaintext modulus, same data) it measures: client encrypt time (mean per client:
encode, encrypt, serialize), upload bytes and expansion over fp32, server load+add time
(all uploads), decrypt time (the server serializes the aggregate, the key holder loads
and decrypts it, the server decodes), and the server's peak RSS.

Each server runs in its own spawned process (its RSS is its own) and takes uploads one
at a time over a pipe, as over a network, acknowledging each before the next is made,
so nothing runs concurrently. Raw TenSEAL runs in two forms: whole vectors (TenSEAL
chunks them itself) and an explicit loop over ciphertexts. The three variants are
interleaved client by client, so that load from other processes falls on all of them
alike. ``overhead_ratio`` is securefed's total time over the faster raw form (target
<= 1.15); ``upload_expansion`` is upload bytes over 4 d (CKKS target <= 15 at N = 8192).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import time

import numpy as np

TARGET_RATIO = 1.15
TARGET_CKKS_EXPANSION = 15.0


def _identities():
    """Identity keys from a fixed seed, so the server's process and the parties' hold the same PKI (a bench
    only: anyone can derive these keys)."""
    from securefed.crypto.random import RandomSource
    from securefed.crypto.signing import (
        KeyDirectory,
        generate_signing_key,
        verify_key_bytes,
    )
    from securefed.protocols.he.wire import DECRYPTOR_ID

    rng = RandomSource(0)
    private = {i: generate_signing_key(rng.child(f"identity/{i}")) for i in [*range(256), DECRYPTOR_ID]}
    return KeyDirectory({i: verify_key_bytes(k) for i, k in private.items()}, private)


def _proto(scheme: str):
    from securefed.protocols.he import BFV, CKKS

    ids = _identities()
    return CKKS(value_range=1.0, identities=ids) if scheme == "ckks" else BFV(value_range=1.0, value_bits=16,
                                                                              identities=ids)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it restarts at exec, so a spawned
    server does not inherit its parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up(scheme: str) -> None:
    """Load the compiled (numba) encoding kernels once, as a long-running process would have."""
    from securefed import kernels
    from securefed.crypto.random import RandomSource
    from securefed.encoding import pack, unpack

    kernels.load()  # a fresh process would run the encoding in numpy ("auto"): measure the compiled loops
    if scheme == "bfv":
        enc = _proto(scheme).encoder
        k = enc.modulus_bits(10)
        enc.decode(unpack(pack(enc.encode(np.zeros(8), n=10, rng=RandomSource()), k), k, 8), n=10, count=10)


# -- server processes: take a message, answer, time the work ----------------------------------------


def _securefed_server(conn, scheme: str, n: int, dim: int, session: bytes) -> None:
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec
    from securefed.protocols.he.parties import DECRYPTOR

    proto = _proto(scheme)
    server = proto.server(RoundSpec(n=n, dim=dim, session_id=session), rng=RandomSource())
    _warm_up(scheme)
    baseline = _peak_rss_mb()
    conn.send_bytes(server.requests("setup")[DECRYPTOR])
    server.receive("setup", DECRYPTOR, conn.recv_bytes())
    for phase in ("setup", "keys"):
        if phase == "keys":
            server.requests(phase)
        server.finish_phase(phase)
    conn.send_bytes(server.requests("upload")[0])  # the same request for every client
    load_add = 0.0
    for c in range(n):
        upload = conn.recv_bytes()
        t = time.perf_counter()
        server.receive("upload", c, upload)
        load_add += time.perf_counter() - t
        del upload
        conn.send_bytes(b"ok")
    server.finish_phase("upload")
    t = time.perf_counter()
    request = server.requests("decrypt")[DECRYPTOR]
    serialize = time.perf_counter() - t
    conn.send_bytes(request)
    del request
    reply = conn.recv_bytes()
    t = time.perf_counter()
    server.receive("decrypt", DECRYPTOR, reply)
    server.finish_phase("decrypt")
    for phase in proto.phases[proto.phases.index("decrypt") + 1 :]:  # BFV's masked-mode phases: empty here
        server.requests(phase)
        server.finish_phase(phase)
    total, _ = server.result()
    decode = time.perf_counter() - t
    conn.send_bytes(total.astype("<f8").tobytes())
    conn.send_bytes(json.dumps({"load_add_s": load_add, "server_decrypt_s": serialize + decode,
                                "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}).encode())


def _raw_server(conn, scheme: str, n: int) -> None:
    import tenseal as ts

    load = ts.ckks_vector_from if scheme == "ckks" else ts.bfv_vector_from
    ctx = ts.context_from(conn.recv_bytes(), n_threads=1)
    baseline = _peak_rss_mb()
    acc = None
    load_add = 0.0
    for _ in range(n):
        parts = [conn.recv_bytes() for _ in range(int(conn.recv_bytes()))]
        t = time.perf_counter()
        vecs = [load(ctx, p) for p in parts]
        if acc is None:
            acc = vecs
        else:
            for a, v in zip(acc, vecs):
                a.add_(v)
        load_add += time.perf_counter() - t
        del parts, vecs
        conn.send_bytes(b"ok")
    t = time.perf_counter()
    blobs = [a.serialize() for a in acc]
    serialize = time.perf_counter() - t
    conn.send_bytes(str(len(blobs)).encode())
    for b in blobs:
        conn.send_bytes(b)
    del blobs
    conn.send_bytes(json.dumps({"load_add_s": load_add, "server_decrypt_s": serialize,
                                "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}).encode())


def _spawn(target, *args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: its RSS is the server's alone
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


# -- the parties that encrypt and decrypt -------------------------------------------------------------


class Securefed:
    """Clients and the decryptor of securefed's CKKS or BFV, talking to their server process."""

    def __init__(self, scheme: str, n: int, dim: int) -> None:
        from securefed.crypto.random import RandomSource
        from securefed.protocols.base import RoundSpec
        from securefed.protocols.he.parties import DECRYPTOR

        self.scheme, self.proto, self.n = scheme, _proto(scheme), n
        session = os.urandom(32)
        self.spec = RoundSpec(n=n, dim=dim, session_id=session)
        self.proc, self.conn = _spawn(_securefed_server, scheme, n, dim, session)
        _warm_up(scheme)
        self.rng = RandomSource()
        self.dec = self.proto.auxiliary(self.spec, rng=self.rng.child("decryptor"))[DECRYPTOR]
        t = time.perf_counter()
        self.conn.send_bytes(self.dec.handle("setup", self.conn.recv_bytes()))
        self.keygen = time.perf_counter() - t
        self.request = self.conn.recv_bytes()
        self.encrypt, self.upload_bytes = 0.0, 0

    def upload(self, i: int, x: np.ndarray) -> None:
        client = self.proto.client(self.spec, i, rng=self.rng.child(f"client/{i}"))
        t = time.perf_counter()
        client.set_input(x)  # checks and encodes (BFV: fixed point with stochastic rounding)
        upload = client.handle("upload", self.request)
        self.encrypt += time.perf_counter() - t
        self.upload_bytes = len(upload)
        self.conn.send_bytes(upload)
        del upload
        self.conn.recv_bytes()

    def finish(self) -> tuple[dict, np.ndarray]:
        aggregate = self.conn.recv_bytes()
        t = time.perf_counter()
        reply = self.dec.handle("decrypt", aggregate)
        key_holder = time.perf_counter() - t
        del aggregate
        self.conn.send_bytes(reply)
        total = np.frombuffer(self.conn.recv_bytes(), dtype="<f8")
        server = json.loads(self.conn.recv_bytes())
        self.proc.join()
        return _record(self, server, key_holder), total


class RawTenSEAL:
    """The same operations with raw TenSEAL calls: whole vectors, or an explicit loop over ciphertexts."""

    def __init__(self, scheme: str, n: int, dim: int, chunked: bool) -> None:
        import tenseal as ts

        self.ts, self.scheme, self.n, self.dim, self.chunked = ts, scheme, n, dim, chunked
        self.proto = _proto(scheme)
        self.ring = self.proto._ring(n)  # the parameters securefed uses in this round
        t = time.perf_counter()
        kwargs = {"plain_modulus": self.ring.plain_modulus} if scheme == "bfv" else {}
        ctx = ts.context(ts.SCHEME_TYPE.CKKS if scheme == "ckks" else ts.SCHEME_TYPE.BFV,
                         self.ring.poly_modulus_degree, coeff_mod_bit_sizes=list(self.ring.coeff_mod_bit_sizes),
                         n_threads=1, **kwargs)
        public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                               save_relin_keys=False)
        self.secret = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                                    save_relin_keys=False)
        self.keygen = time.perf_counter() - t
        self.proc, self.conn = _spawn(_raw_server, scheme, n)
        self.conn.send_bytes(public)
        self.enc_ctx = ts.context_from(public, n_threads=1)
        self.encrypt, self.upload_bytes = 0.0, 0

    def upload(self, i: int, x: np.ndarray) -> None:
        ts, step = self.ts, self.ring.slots if self.chunked else self.dim
        t = time.perf_counter()
        if self.scheme == "ckks":
            values = x.astype(np.float64)
            make = lambda v: ts.ckks_vector(self.enc_ctx, v, self.ring.scale)  # noqa: E731
        else:  # a raw user quantizes by hand: round to nearest at securefed's fixed-point scale
            values = np.rint(x.astype(np.float64) * self.proto.encoder.scale).astype(np.int64)
            make = lambda v: ts.bfv_vector(self.enc_ctx, v)  # noqa: E731
        with contextlib.redirect_stdout(io.StringIO()):  # TenSEAL warns about multi-ciphertext vectors
            parts = [make(values[lo : lo + step].tolist()).serialize() for lo in range(0, self.dim, step)]
        self.encrypt += time.perf_counter() - t
        self.upload_bytes = sum(len(p) for p in parts)
        self.conn.send_bytes(str(len(parts)).encode())
        for p in parts:
            self.conn.send_bytes(p)
        del parts
        self.conn.recv_bytes()

    def finish(self) -> tuple[dict, np.ndarray]:
        ts = self.ts
        blobs = [self.conn.recv_bytes() for _ in range(int(self.conn.recv_bytes()))]
        t = time.perf_counter()
        dec_ctx = ts.context_from(self.secret, n_threads=1)
        load = ts.ckks_vector_from if self.scheme == "ckks" else ts.bfv_vector_from
        total = np.concatenate([np.array(load(dec_ctx, b).decrypt(), dtype=np.float64) for b in blobs])
        key_holder = time.perf_counter() - t
        server = json.loads(self.conn.recv_bytes())
        self.proc.join()
        if self.scheme == "bfv":
            total = total / self.proto.encoder.scale
        rec = _record(self, server, key_holder)
        return {"loop": "per ciphertext" if self.chunked else "whole vector", **rec}, total


def _record(side, server: dict, key_holder: float) -> dict:
    n = side.n
    return {
        "client_encrypt_s": round(side.encrypt / n, 4),
        "upload_bytes": side.upload_bytes,
        "server_load_add_s": round(server["load_add_s"], 4),
        "decrypt_s": round(server["server_decrypt_s"] + key_holder, 4),
        "keygen_s": round(side.keygen, 4),
        "server_peak_rss_mb": round(server["peak_rss_mb"], 1),
        "server_baseline_rss_mb": round(server["baseline_rss_mb"], 1),
    }


def _total_time(r: dict, n: int) -> float:
    return n * r["client_encrypt_s"] + r["server_load_add_s"] + r["decrypt_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=10**6)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--schemes", default="ckks,bfv")
    args = ap.parse_args()
    n, dim = args.clients, args.dim
    gen = np.random.default_rng(0)  # benchmark data, not secret
    xs = [gen.uniform(-1, 1, dim).astype(np.float32) for _ in range(n)]
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    for scheme in args.schemes.split(","):
        load_before = os.getloadavg()[0]
        sides = [Securefed(scheme, n, dim), RawTenSEAL(scheme, n, dim, chunked=False),
                 RawTenSEAL(scheme, n, dim, chunked=True)]
        for i, x in enumerate(xs):
            for side in sides:
                side.upload(i, x)
        (ours, total), (whole, _), (chunks, total_raw) = (side.finish() for side in sides)
        proto = _proto(scheme)
        err = float(np.max(np.abs(total - exact)))
        assert err <= proto.error_bound(n), (err, proto.error_bound(n))
        best_raw = min(_total_time(whole, n), _total_time(chunks, n))
        line = {
            "bench": "he",
            "scheme": scheme,
            "n": n,
            "dim": dim,
            "parameters": proto.describe(n),
            "securefed": ours,
            "raw_tenseal": whole,
            "raw_tenseal_per_ciphertext": chunks,
            "upload_expansion": round(ours["upload_bytes"] / (4 * dim), 3),
            "raw_upload_expansion": round(whole["upload_bytes"] / (4 * dim), 3),
            "overhead_ratio": round(_total_time(ours, n) / best_raw, 3),
            "stage_ratios_vs_per_ciphertext": {
                k: round(ours[k] / chunks[k], 3) for k in ("client_encrypt_s", "server_load_add_s", "decrypt_s")
            },
            "target_overhead_ratio": TARGET_RATIO,
            "max_abs_error": err,
            "raw_max_abs_error": float(np.max(np.abs(total_raw - exact))),
            "error_bound": proto.error_bound(n),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(load_before, 2),
        }
        if scheme == "ckks":
            line["target_upload_expansion"] = TARGET_CKKS_EXPANSION
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
