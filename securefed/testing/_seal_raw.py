"""Raw SEAL access for the HE attack kit: read and forge ciphertexts of a TenSEAL round.

TenSEAL hides the polynomials; an attacker does not care. A TenSEAL vector is a protobuf around
SEAL's own serialization, which SEAL loads uncompressed as readily as compressed, so an attacker
can read every coefficient of an upload and write a ciphertext of its choosing. This module does
that through ``tenseal.sealapi`` (SEAL's Python binding that ships with TenSEAL), for the attacks
of :mod:`securefed.testing.he_attacks`. Test code only: nothing in the protocols imports it.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SealRing"]

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, size
_MAGIC = 0xA15E


def _varint(data: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = data[i]
        v |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return v, i
        shift += 7


def _put_varint(x: int) -> bytes:
    out = bytearray()
    while True:
        b, x = x & 0x7F, x >> 7
        out.append(b | 0x80 if x else b)
        if not x:
            return bytes(out)


def _seal_fields(vector: bytes) -> list[tuple[int, int, int]]:
    """(start, end, key) of each field of a TenSEAL vector's protobuf; `end` of the whole field."""
    out, i = [], 0
    while i < len(vector):
        start = i
        key, i = _varint(vector, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(vector, i)
        elif wire == 2:
            size, i = _varint(vector, i)
            i += size
        else:
            i += 8 if wire == 1 else 4
        out.append((start, i, key))
    return out


def _ciphertext_blob(vector: bytes) -> tuple[bytes, int, int, int]:
    """The SEAL ciphertext inside a one-ciphertext TenSEAL vector, and where its field sits."""
    for start, end, key in _seal_fields(vector):
        if key & 7 == 2:
            _, i = _varint(vector, start)
            size, i = _varint(vector, i)
            if _HEADER.unpack_from(vector, i)[0] == _MAGIC:
                return vector[i : i + size], start, end, key
    raise ValueError("no SEAL ciphertext in this vector")


def _dyn_array(values: np.ndarray, minor: int) -> bytes:
    body = struct.pack("<Q", values.size) + np.ascontiguousarray(values, dtype="<u8").tobytes()
    return _HEADER.pack(_MAGIC, 16, 4, minor, 0, 0, 16 + len(body)) + body


class SealRing:
    """SEAL's view of one round's ring: parameters from its public context, files for SEAL's loaders."""

    def __init__(self, public_context: bytes) -> None:
        import tenseal as ts
        from tenseal import sealapi

        self.api = sealapi
        self.tenseal = ts
        self.context = ts.context_from(public_context)
        first = self.context.data.seal_context().first_context_data().parms()
        key_level = self.context.data.seal_context().key_context_data().parms()
        self.ckks = first.scheme() == ts.SCHEME_TYPE.CKKS.value
        self.degree = first.poly_modulus_degree()
        self.primes = [m.value() for m in first.coeff_modulus()]  # the data level of fresh ciphertexts
        self.plain_modulus = first.plain_modulus().value()
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS if self.ckks else sealapi.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(self.degree)
        parms.set_coeff_modulus([sealapi.Modulus(m.value()) for m in key_level.coeff_modulus()])
        if not self.ckks:
            parms.set_plain_modulus(self.plain_modulus)
        self.seal = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        self.evaluator = sealapi.Evaluator(self.seal)
        self._dir = tempfile.mkdtemp(prefix="securefed-seal-")

    # -- files: SEAL's Python loaders and savers take paths -------------------------------------

    def _load(self, obj: Any, blob: bytes) -> Any:
        path = os.path.join(self._dir, "in")
        with open(path, "wb") as f:
            f.write(blob)
        obj.load(self.seal, path)
        return obj

    def _save(self, obj: Any) -> bytes:
        path = os.path.join(self._dir, "out")
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()

    # -- ciphertexts -------------------------------------------------------------------------

    def ciphertext(self, vector: bytes) -> Any:
        """The SEAL ciphertext of a one-ciphertext TenSEAL vector."""
        return self._load(self.api.Ciphertext(), _ciphertext_blob(vector)[0])

    def polys(self, vector: bytes, *, ntt: bool = False) -> np.ndarray:
        """``(2, L, N)`` uint64 residues of a vector's ciphertext, in coefficient form unless `ntt`."""
        ct = self.ciphertext(vector)
        if ct.is_ntt_form() and not ntt:
            self.evaluator.transform_from_ntt_inplace(ct)
        d = ct.dyn_array()
        flat = np.fromiter((d[i] for i in range(d.size())), dtype=np.uint64, count=d.size())
        return flat.reshape(ct.size(), ct.coeff_modulus_size(), self.degree)

    def forge(self, template: bytes, polys: np.ndarray, *, ntt: bool, scale: float | None = None) -> Any:
        """A SEAL ciphertext with residues `polys` ``(2, L, N)`` at the template's level (and scale)."""
        blob, *_ = _ciphertext_blob(template)
        minor = _HEADER.unpack_from(blob)[3]
        ct = self.ciphertext(template)
        meta = struct.pack("<4Q", *ct.parms_id()) + bytes([int(ntt)]) + struct.pack(
            "<QQQdQ", polys.shape[0], self.degree, polys.shape[1], ct.scale if scale is None else scale, 1)
        body = meta + _dyn_array(polys.reshape(-1), minor)
        return self._load(self.api.Ciphertext(), _HEADER.pack(_MAGIC, 16, 4, minor, 0, 0, 16 + len(body)) + body)

    def vector(self, template: bytes, ct: Any) -> bytes:
        """`template` (a TenSEAL vector of one ciphertext) carrying `ct` instead of its own ciphertext."""
        _, start, end, key = _ciphertext_blob(template)
        blob = self._save(ct)
        return template[:start] + _put_varint(key) + _put_varint(len(blob)) + blob + template[end:]

    # -- plaintexts ----------------------------------------------------------------------------

    def plaintext_ntt(self, template: bytes, values: np.ndarray, scale: float) -> Any:
        """A CKKS plaintext in NTT form with residues `values` ``(L, N)`` at the template's level."""
        blob, *_ = _ciphertext_blob(template)
        minor = _HEADER.unpack_from(blob)[3]
        ct = self.ciphertext(template)
        body = struct.pack("<4QQd", *ct.parms_id(), values.size, scale) + _dyn_array(values.reshape(-1), minor)
        return self._load(self.api.Plaintext(), _HEADER.pack(_MAGIC, 16, 4, minor, 0, 0, 16 + len(body)) + body)

    def residues(self, plain: Any, count: int) -> np.ndarray:
        """The first `count` residues of a SEAL plaintext."""
        return np.fromiter((plain[i] for i in range(count)), dtype=np.uint64, count=count)

    def crt(self, residues: np.ndarray) -> list[int]:
        """Centered integers from residues ``(L, N)`` modulo the data primes."""
        q = 1
        for p in self.primes:
            q *= p
        out = [0] * self.degree
        for p, row in zip(self.primes, residues):
            m = q // p
            w = m * pow(m, -1, p)
            for k, r in enumerate(row.tolist()):
                out[k] += w * r
        return [v % q - q if v % q > q // 2 else v % q for v in out]

    def times_secret(self, c0: np.ndarray, c1: np.ndarray, secret: Sequence[int]) -> np.ndarray:
        """``c0 + c1 s`` modulo every data prime, in coefficient form (s ternary, negacyclic product)."""
        n = self.degree
        out = np.empty((len(self.primes), n), dtype=np.uint64)
        for j, p in enumerate(self.primes):
            a = c1[j].astype(np.uint64)
            acc = c0[j].astype(np.uint64) % np.uint64(p)
            neg = (np.uint64(p) - a) % np.uint64(p)
            for k, sk in enumerate(secret):
                if sk == 0:
                    continue
                # X^k a: coefficients rotate up by k, those that wrap change sign (X^N = -1).
                plus, minus = (a, neg) if sk > 0 else (neg, a)
                acc[k:] += plus[: n - k]
                acc[:k] += minus[n - k :]
                acc %= np.uint64(p)
            out[j] = acc
        return out
