"""What the active variants' model attestation costs on Flower (protocols/flower.md section 1).

Per node and round: the digest of the model and config it was sent (SHA-256 over the arrays' bytes), one
Ed25519 signature, and at the consistency check one verification per survivor. The server digests the model
once per round and verifies one signature per input. Measured on a float32 model of `--dim` values in
`--arrays` arrays, `--survivors` attestations checked; the digest is also given as a multiple of one copy of
the model's bytes (numpy), best of `--repeat`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from securefed.crypto.signing import KeyDirectory
from securefed.flower import _attest


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=10_000_000)
    ap.add_argument("--arrays", type=int, default=10)
    ap.add_argument("--survivors", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)  # benchmark data, not secret
    parts = np.array_split(rng.standard_normal(args.dim, dtype=np.float32), args.arrays)
    arrays = ArrayRecord({f"layer{i}": Array(p) for i, p in enumerate(parts)})
    config = ConfigRecord({"lr": 0.01, "local-epochs": 1, "batch-size": 32, "server-round": 7})
    flat = np.concatenate(parts)
    digest = best(lambda: _attest.digest(arrays, config), args.repeat)
    copy = best(lambda: flat.copy(), args.repeat)
    keys = KeyDirectory.generate(args.survivors)
    session = bytes(32)
    model = _attest.digest(arrays, config) + _attest.run_digest({"local-epochs": 1})
    sign = best(lambda: _attest.sign(keys, 0, session, model), args.repeat)
    field = _attest.pack({c: _attest.sign(keys, c, session, model) for c in range(args.survivors)})
    survivors = np.arange(args.survivors)
    check = best(lambda: _attest.check_survivors(keys, session, model, survivors, field), args.repeat)
    print(json.dumps({
        "bench": "attest", "dim": args.dim, "arrays": args.arrays, "survivors": args.survivors,
        "digest_seconds": round(digest, 4), "digest_over_copy": round(digest / copy, 2),
        "digest_gb_per_second": round(flat.nbytes / digest / 1e9, 2), "sign_seconds": round(sign, 6),
        "check_survivors_seconds": round(check, 4), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
