"""An active server against the HE key holders (issue 18, part 4): crafted "aggregates" that decrypt to the key.

Each attack runs an honest round through the real party objects up to the decrypt phase (the
server behaves until then, so it holds the public context and every upload), then sends the
key holder, through its ``handle()`` and with well-formed framed bytes, a decrypt request whose
ciphertexts it crafted:

- CKKS: ``(0, C)`` and ``(0, C Encode(i))`` decrypt to ``C s`` and ``C i s``; their releases are
  ``Re sigma(s)`` and ``-Im sigma(s)`` scaled by ``C / Delta`` (chosen to pass the range check), and
  SEAL's encoder turns ``sigma(s)`` back into ``s``. With ``s`` every upload decrypts.
- BFV: ``(0, round(q a / t))`` decrypts to ``a s``: its slots ``u * sigma_t(s)`` pass the range check
  when ``t`` sits close above ``n 2^k``; the release gives their low ``k`` bits, a second chunk
  with ``u 2^-k`` the top bits. A refused request may be retried with fresh ``u`` (``attempts``).

The crafted ciphertexts ride in the decrypt request's layout, inside a signed upload of client 0
(its signature kept). A key holder that checks signatures refuses; one that decrypts whatever it is
given (the behaviour before the fix) hands over its key. Each attack reports what it got.

A third attack needs no crafted ciphertext: in ``"clients"`` mode, when the dealer was the lowest
client of the key list the server sent (before the fix), the server could send each group of
clients its own key list and so make one dealer per group, each decrypting its own group's signed
uploads (``clients_mode_partition``): every input in one round with ``min_clients = 1``. The
dealer is now client 0, fixed, and every other client refuses to deal or to take another's key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.encoding.packing import unpack
from securefed.errors import MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import AggregationProtocol, ClientProtocol, RoundSpec
from securefed.protocols.he.wire import Framer, Reader, blobs, u32
from securefed.testing._seal_raw import SealRing

__all__ = ["AttackOutcome", "PartitionOutcome", "bfv_key_recovery", "ckks_key_recovery", "clients_mode_partition"]

_SIG, _KEY_ID = 64, 32
_DECRYPTOR = "decryptor"


@dataclasses.dataclass(frozen=True)
class AttackOutcome:
    """What the attack obtained: the secret key, and with it a victim's upload decrypted."""

    recovered_key: tuple[int, ...] | None  # SEAL's ternary secret key, coefficient by coefficient
    victim: int  # the client whose upload the attack decrypts with the recovered key
    victim_error: float | None  # max |decrypted upload - the victim's input| (masked BFV: None, see below)
    victim_decrypted: np.ndarray | None  # the victim's upload, decrypted and decoded with the recovered key
    refused: str | None  # the key holder's last refusal, "Type: message"
    attempts: int  # decrypt requests sent

    @property
    def key_recovered(self) -> bool:
        return self.recovered_key is not None


@dataclasses.dataclass
class _Round:
    protocol: Any
    spec: RoundSpec
    inputs: list[np.ndarray]
    holder: ClientProtocol
    uploads: dict[int, bytes]  # client -> upload payload (signature || key id || blobs)
    seal: SealRing

    def blobs(self, client: int) -> list[bytes]:
        body = memoryview(self.uploads[client])[_SIG + _KEY_ID :]
        count, off, out = int.from_bytes(body[:4], "big"), 4, []
        for _ in range(count):
            size = int.from_bytes(body[off : off + 4], "big")
            out.append(bytes(body[off + 4 : off + 4 + size]))
            off += 4 + size
        return out

    def request(self, chunks: Sequence[bytes], extra: int = 0) -> bytes:
        """A decrypt request: client 0's signed upload with `chunks` for its ciphertexts, then `extra`
        more clients' uploads with zero ciphertexts (a count the range check and minimum accept)."""
        def entry(c: int, parts: Sequence[bytes]) -> list[bytes]:
            up = self.uploads[c]
            body = b"".join([up[: _SIG + _KEY_ID], *blobs(list(parts))])
            return [u32(c), u32(len(body)), body]

        items = [u32(1 + extra), *entry(0, chunks)]
        for c in range(1, 1 + extra):
            items += entry(c, [self.zero(ch) for ch in chunks])
        return Framer(self.protocol, self.spec).message("decrypt", wire.SERVER, items)

    def zero(self, vector: bytes) -> bytes:
        polys = self.seal.polys(vector, ntt=self.seal.ckks)
        return self.seal.vector(vector, self.seal.forge(vector, np.zeros_like(polys), ntt=self.seal.ckks))

    def ask(self, request: bytes) -> tuple[memoryview | None, str | None]:
        """The key holder's release, or why it refused."""
        try:
            reply = self.holder.handle("decrypt", request)
        except (MessageRejected, ProtocolAborted) as e:
            return None, f"{type(e).__name__}: {e}"
        assert reply is not None
        return memoryview(reply)[wire.HEADER_SIZE + 4 :], None


def _honest_until_decrypt(protocol: AggregationProtocol, inputs: Sequence[np.ndarray], seed: int) -> _Round:
    """Setup, keys and upload as an honest server runs them; the key holder is not asked yet."""
    rng = RandomSource(seed)
    n, dim = len(inputs), inputs[0].size
    spec = RoundSpec(n=n, dim=dim, session_id=rng.child("session").token_bytes(32))
    server = protocol.server(spec, rng=rng.child("server"))
    parties: dict[Any, ClientProtocol] = {i: protocol.client(spec, i, inputs[i], rng=rng.child(f"client/{i}"))
                                          for i in range(n)}
    parties.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    uploads: dict[int, bytes] = {}
    for phase in protocol.phases[: protocol.phases.index("decrypt")]:
        for who, req in server.requests(phase).items():
            reply = parties[who].handle(phase, req)
            if reply is not None:
                server.receive(phase, who, reply)
                if phase == "upload":
                    uploads[int(who)] = bytes(memoryview(reply)[wire.HEADER_SIZE + 4 :])
        server.finish_phase(phase)
    holder = parties[_DECRYPTOR] if _DECRYPTOR in parties else parties[0]  # clients mode: client 0 dealt
    public = server.public_context  # type: ignore[attr-defined]
    return _Round(protocol, spec, list(inputs), holder, uploads, SealRing(public))


# -- CKKS ---------------------------------------------------------------------------------------------


def ckks_key_recovery(protocol: Any, inputs: Sequence[np.ndarray], *, seed: int = 0, victim: int = 1) -> AttackOutcome:
    """Recover a CKKS round's secret key through its key holder and decrypt `victim`'s upload with it.

    Needs at least two full ciphertexts per upload (``dim >= N``: any real model)."""
    r = _honest_until_decrypt(protocol, inputs, seed)
    desc, seal = protocol.describe(r.spec.n), r.seal  # the public parameters: slots, scale
    slots, scale_bits = desc["slots"], desc["scale_bits"]
    template = r.blobs(0)
    if r.spec.dim < slots * 2:
        raise ValueError("the CKKS attack needs dim >= N (two full ciphertexts)")
    limit = r.spec.n * protocol.value_range  # the range check allows n inputs' range when n clients are listed
    shrink = max(0, int(np.ceil(np.log2(6 * np.sqrt(desc['poly_modulus_degree']) / limit))))
    const = 1 << (scale_bits - shrink)
    real = _constant_times_one(seal, template[0], const)
    imag = _constant_times_i(seal, template[1], const)
    request = r.request([real, imag, *template[2:]], extra=r.spec.n - 1)
    released, refused = r.ask(request)
    if released is None:
        return AttackOutcome(None, victim, None, None, refused, 1)
    z = np.frombuffer(released, dtype="<f8")
    scale = 2.0**shrink
    sigma = scale * (z[:slots] - 1j * z[slots : 2 * slots])  # Re sigma(s), -Im sigma(s)
    key_ntt = _encode(seal, template[0], sigma, 1.0)  # SEAL's own inverse embedding: s, in NTT form
    key = _key_coefficients(seal, template[0], key_ntt)
    decrypted = _ckks_decrypt(seal, r.blobs(victim), key_ntt, 2.0**scale_bits, r.spec.dim, template)
    error = float(np.max(np.abs(decrypted - r.inputs[victim])))
    return AttackOutcome(tuple(key), victim, error, decrypted, None, 1)


def _constant_times_one(seal: SealRing, template: bytes, const: int) -> bytes:
    """``(0, const)``: in NTT form a constant polynomial is the constant in every position."""
    polys = np.zeros_like(seal.polys(template, ntt=True))
    for j, p in enumerate(seal.primes):
        polys[1, j, :] = const % p
    return seal.vector(template, seal.forge(template, polys, ntt=True))


def _constant_times_i(seal: SealRing, template: bytes, const: int) -> bytes:
    """``(0, const Encode(i))``: ``(0, const / 2^30)`` at scale Delta / 2^30 times Encode(i) at scale 2^30."""
    split = 1 << 30
    polys = np.zeros_like(seal.polys(template, ntt=True))
    for j, p in enumerate(seal.primes):
        polys[1, j, :] = (const // split) % p
    ct = seal.forge(template, polys, ntt=True, scale=seal.ciphertext(template).scale / split)
    out = seal.api.Ciphertext()
    seal.evaluator.multiply_plain(ct, _encode(seal, template, [1j] * (seal.degree // 2), float(split)), out)
    return seal.vector(template, out)


def _encode(seal: SealRing, template: bytes, values: Any, scale: float) -> Any:
    plain = seal.api.Plaintext()
    seal.api.CKKSEncoder(seal.seal).encode(list(values), seal.ciphertext(template).parms_id(), scale, plain)
    return plain


def _key_coefficients(seal: SealRing, template: bytes, key_ntt: Any) -> list[int]:
    """The ternary coefficients of a key given in NTT form (SEAL's inverse NTT, through a ciphertext)."""
    residues = seal.residues(key_ntt, len(seal.primes) * seal.degree).reshape(len(seal.primes), seal.degree)
    polys = np.stack([residues, residues])
    ct = seal.forge(template, polys, ntt=True)
    seal.evaluator.transform_from_ntt_inplace(ct)
    d = ct.dyn_array()
    p = seal.primes[0]
    return [v - p if v > p // 2 else v for v in (d[i] for i in range(seal.degree))]


def _ckks_decrypt(seal: SealRing, chunks: list[bytes], key_ntt: Any, scale: float, dim: int,
                  template: list[bytes]) -> np.ndarray:
    """``c0 + c1 s`` slot by slot in NTT form (pointwise), decoded by SEAL's encoder."""
    count = len(seal.primes) * seal.degree
    s = [int(v) for v in seal.residues(key_ntt, count)]
    out = []
    for chunk, tmpl in zip(chunks, template):
        c = seal.polys(chunk, ntt=True)
        m = np.empty((len(seal.primes), seal.degree), dtype=np.uint64)
        for j, p in enumerate(seal.primes):
            c0, c1 = c[0, j].tolist(), c[1, j].tolist()
            row = s[j * seal.degree : (j + 1) * seal.degree]
            m[j] = [(a + b * k) % p for a, b, k in zip(c0, c1, row)]
        plain = seal.plaintext_ntt(tmpl, m, scale)
        values = seal.api.CKKSEncoder(seal.seal).decode_double(plain)
        out.append(np.array(values[: seal.tenseal.ckks_vector_from(seal.context, chunk).size()]))
    return np.concatenate(out)[:dim]


# -- BFV ----------------------------------------------------------------------------------------------


def bfv_key_recovery(protocol: Any, inputs: Sequence[np.ndarray], *, seed: int = 0, victim: int = 1,
                     attempts: int = 1) -> AttackOutcome:
    """Recover a BFV round's secret key through its key holder (retrying refused requests with fresh
    multipliers, up to `attempts`) and decrypt `victim`'s upload with it. Needs ``dim >= 2N``.

    In masked mode the victim's upload decrypts to its masked input: ``victim_error`` is None and
    ``victim_decrypted`` holds the masked values mod 2^k."""
    r = _honest_until_decrypt(protocol, inputs, seed)
    seal, n = r.seal, r.spec.n
    t, k = seal.plain_modulus, protocol.encoder.modulus_bits(n)
    template = r.blobs(0)
    if len(template) < 2 or seal.tenseal.bfv_vector_from(seal.context, template[1]).size() < seal.degree:
        raise ValueError("the BFV attack needs dim >= 2N (two full ciphertexts)")
    extra = n - 1  # every client listed: the widest range check
    gen = np.random.default_rng(seed)
    refused = None
    for attempt in range(1, attempts + 1):
        u = [1] * seal.degree if attempt == 1 else [int(x) for x in gen.integers(1, t, seal.degree)]
        inv = pow(1 << k, -1, t)
        chunks = [_times_key(seal, template[0], u), _times_key(seal, template[1], [x * inv % t for x in u])]
        released, refused = r.ask(r.request([*chunks, *template[2:]], extra))
        if released is None:
            continue
        low = unpack(released, k, r.spec.dim).astype(np.int64)
        slots = _top_bits(low[: seal.degree], low[seal.degree : 2 * seal.degree], t, k, n)
        key = _batch_coefficients(seal, [v * pow(x, -1, t) % t for v, x in zip(slots, u)])
        decrypted = _bfv_decrypt(seal, r.blobs(victim), key, r.spec.dim)
        if protocol.key_holder == "masked":
            return AttackOutcome(tuple(key), victim, None, decrypted % (1 << k), None, attempt)
        values = protocol.encoder.decode((decrypted % (1 << k)).astype(np.uint64), n=n, count=1)
        error = float(np.max(np.abs(values - r.inputs[victim])))
        return AttackOutcome(tuple(key), victim, error, values, None, attempt)
    return AttackOutcome(None, victim, None, None, refused, attempts)


def _times_key(seal: SealRing, template: bytes, u: Sequence[int]) -> bytes:
    """``(0, round(q a / t))`` with ``a`` the batch encoding of `u`: it decrypts to ``a s``."""
    t = seal.plain_modulus
    plain = seal.api.Plaintext()
    seal.api.BatchEncoder(seal.seal).encode([int(x) for x in u], plain)
    a = seal.residues(plain, seal.degree).tolist()
    q = _product(seal.primes)
    polys = np.zeros_like(seal.polys(template))
    for j, p in enumerate(seal.primes):
        polys[1, j] = [((q * x + t // 2) // t) % p for x in a]
    return seal.vector(template, seal.forge(template, polys, ntt=False))


def _product(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _top_bits(low1: np.ndarray, low2: np.ndarray, t: int, k: int, n: int) -> list[int]:
    """Slot values x (|x| <= n 2^(k-1)) from x mod 2^k and (x 2^-k mod t) mod 2^k."""
    inv, mask, bound = pow(1 << k, -1, t), (1 << k) - 1, n << (k - 1)
    out = []
    for lo, lo2 in zip(low1.tolist(), low2.tolist()):
        base = lo * inv % t
        for h in range(-(n // 2) - 2, n // 2 + 3):
            x = lo + (h << k)
            y = (base + h) % t
            y = y - t if y > t // 2 else y
            if abs(x) <= bound and abs(y) <= bound and y & mask == lo2:
                out.append(x % t)
                break
        else:
            out.append(lo)  # no candidate: the key will not check out
    return out


def _batch_coefficients(seal: SealRing, slots: Sequence[int]) -> list[int]:
    """The centered coefficients of the polynomial whose slots are `slots` (SEAL's batch encoding)."""
    t = seal.plain_modulus
    plain = seal.api.Plaintext()
    seal.api.BatchEncoder(seal.seal).encode([int(v) for v in slots], plain)
    return [v - t if v > t // 2 else v for v in seal.residues(plain, seal.degree).tolist()]


def _bfv_decrypt(seal: SealRing, chunks: list[bytes], key: Sequence[int], dim: int) -> np.ndarray:
    """``round(t (c0 + c1 s) / q) mod t``, batch-decoded, centered."""
    t, q = seal.plain_modulus, _product(seal.primes)
    out = []
    for chunk in chunks:
        c = seal.polys(chunk)
        x = seal.crt(seal.times_secret(c[0], c[1], key))
        m = [((t * v + q // 2) // q) % t for v in x]
        hexpoly = " + ".join(f"{c:X}x^{i}" if i else f"{c:X}" for i, c in reversed(list(enumerate(m))) if c) or "0"
        slots = seal.api.BatchEncoder(seal.seal).decode_int64(seal.api.Plaintext(hexpoly))
        size = seal.tenseal.bfv_vector_from(seal.context, chunk).size()
        out.append(np.array(slots[:size], dtype=np.int64))
    return np.concatenate(out)[:dim]


# -- "clients" mode: one dealer per group ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartitionOutcome:
    """What the multi-dealer attack obtained in one round: one release per key list that a client dealt."""

    groups: tuple[tuple[int, ...], ...]  # the key lists the server sent, each to its lowest client
    released: dict[tuple[int, ...], np.ndarray]  # key list -> the decoded sum its dealer released
    errors: dict[tuple[int, ...], float]  # key list -> max |release - the exact sum of its clients' inputs|
    refused: tuple[str, ...]  # every refusal, "client i, phase: Type: message"

    @property
    def decryptions(self) -> int:
        """Sums released in the round: more than one is what the protocol must rule out."""
        return len(self.released)

    @property
    def exposed(self) -> tuple[int, ...]:
        """The clients whose input was released on its own."""
        return tuple(sorted(g[0] for g in self.released if len(g) == 1))


def clients_mode_partition(protocol: Any, inputs: Sequence[np.ndarray], *, seed: int = 0,
                           group_size: int | None = None) -> PartitionOutcome:
    """An active server equivocating in a ``"clients"`` mode round's keys phase, through the parties' ``handle()``.

    Setup is honest (every client advertises its signed X25519 key). The server cuts the clients
    into groups of `group_size` consecutive ids (default ``min_survivors(n)``, the smallest sum a
    key holder releases; a short remainder joins the last group) and sends each group's lowest
    client a keys request listing that group alone, with its members' genuine signed keys; it
    relays each dealer's public context and sealed keys to its group only, then asks each dealer to
    decrypt its own group's signed uploads. The server signs nothing and holds no private key: it
    only relays what honest parties signed. Against a dealer chosen as the lowest of the list it
    receives, each group gets its own key and decryption (every input alone with ``min_clients = 1``);
    against a fixed dealer every other would-be dealer refuses, leaving at most one release."""
    rng = RandomSource(seed)
    n, dim = len(inputs), inputs[0].size
    spec = RoundSpec(n=n, dim=dim, session_id=rng.child("session").token_bytes(32))
    frame = Framer(protocol, spec)
    clients = {i: protocol.client(spec, i, inputs[i], rng=rng.child(f"client/{i}")) for i in range(n)}
    refused: list[str] = []

    def ask(client: int, phase: str, items: list[bytes]) -> memoryview | None:
        try:
            reply = clients[client].handle(phase, frame.message(phase, wire.SERVER, items))
        except (MessageRejected, ProtocolAborted) as e:
            refused.append(f"client {client}, {phase}: {type(e).__name__}: {e}")
            return None
        assert reply is not None
        return memoryview(reply)[wire.HEADER_SIZE + 4 :]

    signed_kex = {}  # client -> X25519 key || its signature, as the honest setup replies carry them
    for i in range(n):
        reply = ask(i, "setup", [])
        if reply is not None:
            signed_kex[i] = bytes(reply)
    size = group_size or protocol.min_survivors(n)
    groups = [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
    if len(groups) > 1 and len(groups[-1]) < size:
        groups[-2] += groups.pop()
    released: dict[tuple[int, ...], np.ndarray] = {}
    errors: dict[tuple[int, ...], float] = {}
    for group in groups:
        dealer = group[0]
        items = [u32(len(group))]
        for j in group:
            items += [u32(j), signed_kex[j]]
        reply = ask(dealer, "keys", items)
        if reply is None:
            continue
        r = Reader(reply)
        public = bytes(r.blob())
        sealed = {}
        for _ in range(r.u32()):
            j = r.u32()
            sealed[j] = bytes(r.blob())
        uploads = []
        for j in group:
            upload = ask(j, "upload", [u32(len(public)), public, u32(dealer), signed_kex[dealer], sealed.get(j, b"")])
            if upload is not None:
                uploads.append((j, bytes(upload)))
        items = [u32(len(uploads))]
        for j, up in uploads:
            items += [u32(j), u32(len(up)), up]
        release = ask(dealer, "decrypt", items)
        if release is None:
            continue
        total = protocol._total(release, spec, len(uploads))
        key = tuple(j for j, _ in uploads)
        released[key] = total
        errors[key] = float(np.max(np.abs(total - sum(inputs[j] for j in key))))
    return PartitionOutcome(tuple(tuple(g) for g in groups), released, errors, tuple(refused))
