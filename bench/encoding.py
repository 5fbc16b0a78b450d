"""Quantize and pack throughput at d = 10^7 for modulus widths 20, 32 and 40, next to a numpy copy.

Prints one JSON line. Each timing is the best of `--repeat` runs, with the copy of
the same float32 array measured in the same run; ``ratio`` is (quantize + pack)
time over copy time (target: <= 10), with the compiled loops (a long-running process);
``numpy`` has the same with numpy's loops, what a fresh process runs (``securefed.kernels``).
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit

import numpy as np

from securefed import kernels
from securefed.crypto.random import RandomSource
from securefed.encoding import FixedPoint, pack


def best(f, repeat: int) -> float:
    """Fastest of `repeat` single calls (seconds)."""
    return min(timeit.repeat(f, repeat=repeat, number=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=10**7)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    d, n = args.dim, 16  # k = value_bits + ceil(log2 16) = value_bits + 4
    x = np.random.default_rng(0).uniform(-1, 1, d).astype(np.float32)  # benchmark data, not secret
    rng = RandomSource(0)
    out = {"bench": "encoding", "dim": d, "n": n, "input_dtype": "float32", "machine": platform.machine(),
           "threads": 1, "widths": {}}
    kernels.load()
    FixedPoint(value_range=1.0, value_bits=8).encode(x[:100], n=n, rng=rng)  # load compiled kernels
    for k in (20, 32, 40):
        fp = FixedPoint(value_range=1.0, value_bits=k - 4)
        q = fp.encode(x, n=n, rng=rng)
        assert fp.modulus_bits(n) == k
        t_copy = best(lambda: x.copy(), args.repeat)
        t_q = best(lambda fp=fp: fp.encode(x, n=n, rng=rng), args.repeat)
        t_p = best(lambda q=q, k=k: pack(q, k), args.repeat)
        out["widths"][str(k)] = {
            "copy_values_per_s": round(d / t_copy),
            "quantize_values_per_s": round(d / t_q),
            "pack_values_per_s": round(d / t_p),
            "quantize_pack_values_per_s": round(d / (t_q + t_p)),
            "ratio_vs_copy": round((t_q + t_p) / t_copy, 2),
            "packed_bytes": int(pack(q, k).size),
        }
    kernels.set_mode("numpy")
    out["numpy"] = {}
    for k in (20, 32, 40):
        fp = FixedPoint(value_range=1.0, value_bits=k - 4)
        q = fp.encode(x, n=n, rng=rng)
        t_copy = best(lambda: x.copy(), args.repeat)
        t_q = best(lambda fp=fp: fp.encode(x, n=n, rng=rng), args.repeat)
        t_p = best(lambda q=q, k=k: pack(q, k), args.repeat)
        out["numpy"][str(k)] = {"quantize_values_per_s": round(d / t_q), "pack_values_per_s": round(d / t_p),
                                "ratio_vs_copy": round((t_q + t_p) / t_copy, 2)}
    kernels.set_mode(None)
    out["max_ratio"] = max(w["ratio_vs_copy"] for w in out["widths"].values())
    out["target_ratio"] = 10
    print(json.dumps(out))


if __name__ == "__main__":
    main()
