"""Homomorphic aggregation: CKKS (approximate reals) and BFV (exact integers) through TenSEAL.

Clients encrypt under a public key; the server adds ciphertexts as they arrive and
never holds a secret key; whoever holds the key decrypts only the sum. A client that
drops is simply absent from the sum: there is no recovery round. Phases:
``("setup", "keys", "upload", "decrypt")``. Who holds the key (``key_holder``):

- ``"decryptor"`` (default): a separate party, ``"decryptor"``, makes a fresh key pair each
  round, signs the public context it gives the server, and later decrypts one sum once.
  Safe while the server and the decryptor do not collude.
- ``"clients"``: client 0, always (the dealer), makes the key and sends the secret key to
  every other client sealed under X25519 + HKDF + AES-GCM (the server relays ciphertext only);
  the dealer alone decrypts the sum, so a round without client 0 aborts. No other client deals or
  takes another client's key: a dealer the server could pick per key list gave it one key and
  one decryption per client. Safe while the server colludes with no client.
- ``"masked"`` (BFV only): a decryptor holds the key and SecAgg+'s pairwise masks are added to
  the encoded input before encryption, so even the decryptor with the server sees only masked
  inputs; dropouts are then recovered as in SecAgg+ (phases ``consistency_check``, ``unmasking``).

Against an active server, a key holder decrypts only a sum it formed itself from uploads their
clients signed (Ed25519, ``identities=``) for this round and key, never a ciphertext the server
hands it: crafted ciphertexts would decrypt to the secret key (``securefed.testing.he_attacks``).

See ``protocols/he.md`` (messages, key flows, parameters) and ``proofs/he.md``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import (
    KeyDirectory,
    generate_signing_key,
    verify_key_bytes,
)
from securefed.encoding.fixedpoint import (
    FixedPoint,
    IntegerEncoder,
    check_finite,
    check_positive_count,
    check_vector,
)
from securefed.encoding.packing import pack, storage_dtype, unpack
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
)
from securefed.protocols import wire
from securefed.protocols.base import (
    AggregationProtocol,
    ClientProtocol,
    RoundSpec,
    ServerProtocol,
)
from securefed.protocols.he import params, state
from securefed.protocols.he.masked import MaskedClient, MaskedServer
from securefed.protocols.he.parties import DECRYPTED, HEClient, HEDecryptor
from securefed.protocols.he.server import HEServer
from securefed.protocols.he.tenseal import Ring
from securefed.protocols.he.wire import DECRYPTOR, DECRYPTOR_ID, Framer
from securefed.protocols.secagg import MaskedAggregation, SecAgg, SecAggPlus

__all__ = ["BFV", "CKKS", "HEProtocol", "KeyHolder"]

KeyHolder = Literal["decryptor", "clients", "masked"]
log = logging.getLogger("securefed.protocols.he")


def _with_decryptor(clients: KeyDirectory, own: KeyDirectory) -> KeyDirectory:
    """`clients` plus the decryptor's keys from `own`, where `own` has them (public, and private if held)."""
    try:
        vk = own.verify_key(DECRYPTOR_ID)
    except ConfigurationError:
        return clients
    n = len(clients)
    public = {i: clients.verify_key(i) for i in range(n)}
    private = {}
    for party, keys in ((DECRYPTOR_ID, own), *((i, clients) for i in range(n))):
        try:
            private[party] = keys.signing_key(party)
        except ConfigurationError:
            pass
    return KeyDirectory({**public, DECRYPTOR_ID: vk}, private)


def _simulated_directory(n: int) -> KeyDirectory:
    """Identity keys for clients 0..n-1 and the decryptor, all held here (simulation only)."""
    rng = RandomSource()
    private = {i: generate_signing_key(rng.child(f"identity/{i}")) for i in [*range(n), DECRYPTOR_ID]}
    return KeyDirectory({i: verify_key_bytes(k) for i, k in private.items()}, private)


class HEProtocol(AggregationProtocol):
    """What CKKS and BFV share: key holders, ring parameters, the parties and their states."""

    phases: tuple[str, ...] = ("setup", "keys", "upload", "decrypt")
    input_phase = "upload"
    key_holders: tuple[str, ...] = ("decryptor", "clients")
    _TAG = b""

    def __init__(self, key_holder: str, poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int] | None,
                 identities: KeyDirectory | None = None, min_clients: int = 1) -> None:
        # isinstance first: `in` and `==` on a numpy array compare elementwise (numpy's ambiguous-truth ValueError)
        if not isinstance(key_holder, str) or key_holder not in self.key_holders:
            raise ConfigurationError(
                f"{type(self).__name__} key_holder must be one of {self.key_holders}, got {key_holder!r}"
            )
        if identities is not None and not isinstance(identities, KeyDirectory):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory")
        if not isinstance(min_clients, int) or isinstance(min_clients, bool) or min_clients < 1:
            raise ConfigurationError(f"min_clients must be an integer >= 1, got {min_clients!r}")
        if min_clients != 1 and key_holder == "masked":
            raise ConfigurationError(
                "in masked mode the masking protocol's threshold is the minimum: leave min_clients=1")
        self.min_clients = min_clients
        self.identities = identities
        self._simulated_pki: dict[int, KeyDirectory] = {}  # shared by copies (with_encoder): one PKI per run
        self.key_holder = key_holder
        self.poly_modulus_degree = poly_modulus_degree
        self.coeff_mod_bit_sizes = (
            None if coeff_mod_bit_sizes is None else params.check_ring(poly_modulus_degree, coeff_mod_bit_sizes)
        )

    def directory(self, n: int) -> KeyDirectory:
        """The identity keys in force for a round of n: clients 0..n-1 and, unless in ``"clients"`` mode,
        the decryptor (id ``0xFFFFFFFE``). Without ``identities=``, a simulated PKI (simulation only: every
        signing key is in this process). ConfigurationError when the directory lacks a key."""
        if self.identities is None:
            if n not in self._simulated_pki:
                log.warning("%s without identities=: generating a simulated PKI (simulation only)", self.name)
                self._simulated_pki[n] = _simulated_directory(n)
            return self._simulated_pki[n]
        if not self.identities.covers(n):
            raise ConfigurationError(f"the identity directory does not cover clients 0..{n - 1}")
        if self.key_holder != "clients":
            try:
                self.identities.verify_key(DECRYPTOR_ID)
            except ConfigurationError:
                raise ConfigurationError(
                    f"the identity directory has no key for the decryptor (id {DECRYPTOR_ID:#x}): clients could "
                    "not tell its public context from one the server made") from None
        return self.identities

    def with_identities(self, identities: KeyDirectory) -> HEProtocol:
        """A copy verifying clients 0..n-1 against `identities` (a round's directory, as Flower builds it
        from node ids); the decryptor's key, which such a directory lacks, is kept from this protocol's
        own ``identities``. ConfigurationError for anything but a KeyDirectory."""
        if not isinstance(identities, KeyDirectory):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory")
        merged = identities
        if self.identities is not None and self.key_holder != "clients":
            merged = _with_decryptor(identities, self.identities)
        other = copy.copy(self)
        other.identities = merged
        return other

    # -- scheme hooks (implemented by CKKS and BFV) --------------------------------------

    def _ring(self, n: int) -> Ring:
        """The ring, moduli and scale in force for a round of n clients; ConfigurationError."""
        raise NotImplementedError

    def _prepare(self, x: np.ndarray, spec: RoundSpec, rng: RandomSource) -> np.ndarray:
        """A client's checked input as the slot values it encrypts (float64 or centered int64)."""
        raise NotImplementedError

    def _release(self, values: np.ndarray, spec: RoundSpec, count: int) -> bytes:
        """What the key holder reveals of `values`, the decrypted aggregate of `count` uploads.

        Raises ProtocolAborted (the key holder refuses) if the sum is outside what `count` honest
        inputs can produce: an upload was out of range or not an honest encryption."""
        raise NotImplementedError

    def _total(self, released: memoryview, spec: RoundSpec, count: int) -> np.ndarray:
        """The float64 sum from a released aggregate of `count` clients; MessageRejected if malformed."""
        raise NotImplementedError

    def _released_size(self, spec: RoundSpec) -> int:
        raise NotImplementedError

    # -- AggregationProtocol ------------------------------------------------------------

    def server(self, spec: RoundSpec, *, rng: RandomSource) -> ServerProtocol:
        self.directory(spec.n)  # a missing identity key is a ConfigurationError before the round
        self.min_survivors(spec.n)
        return HEServer(self, spec, self._ring(spec.n))

    def client(
        self, spec: RoundSpec, client: int, x: np.ndarray | None = None, *, rng: RandomSource
    ) -> ClientProtocol:
        if not isinstance(client, int) or not 0 <= client < spec.n:
            raise InvalidInput(f"client index must be in 0..{spec.n - 1}, got {client!r}")
        return HEClient(self, spec, self._ring(spec.n), client, x, rng)

    def auxiliary(self, spec: RoundSpec, *, rng: RandomSource) -> dict[str, ClientProtocol]:
        """``{"decryptor": ...}`` when a separate party holds the key; none in ``"clients"`` mode."""
        if self.key_holder == "clients":
            return {}
        return {DECRYPTOR: HEDecryptor(self, spec, self._ring(spec.n), rng)}

    def load_client(self, data: bytes, *, rng: RandomSource) -> ClientProtocol:
        """Restore a client or decryptor saved by ``dump()``; InvalidInput for anything else."""
        role, spec, party, stage, fields = state.parse(self, data)
        if role == state.ROLE_DECRYPTOR and party == DECRYPTOR_ID and self.key_holder != "clients":
            return HEDecryptor.from_state(self, spec, stage, fields, rng)
        if role != state.ROLE_CLIENT or not 0 <= party < spec.n or stage > DECRYPTED:
            raise state.invalid(self)
        if self.key_holder == "masked":
            return MaskedClient.from_state(self, spec, party, stage, fields, rng)  # type: ignore[arg-type]
        return HEClient.from_state(self, spec, party, stage, fields, rng)

    def min_survivors(self, n: int) -> int:
        """``min_clients`` (default 1): dropouts need no recovery, and the key holder decrypts no sum of fewer
        uploads (masked BFV: its masking's threshold). ConfigurationError if n < min_clients."""
        if n < self.min_clients:
            raise ConfigurationError(f"a round of {n} clients cannot reach min_clients={self.min_clients}")
        return self.min_clients

    def describe(self, n: int) -> dict[str, Any]:
        ring = self._ring(n)
        return {
            "protocol": self.name,
            "n": n,
            "min_survivors": self.min_survivors(n),
            "min_clients": self.min_clients,
            "key_holder": self.key_holder,
            "poly_modulus_degree": ring.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(ring.coeff_mod_bit_sizes),
            "security_bits": 128,
            "slots": ring.slots,
        }

    @classmethod
    def _check_common(cls, desc: Mapping[str, Any]) -> list[str]:
        problems = []
        if desc.get("key_holder") not in cls.key_holders:
            problems.append(f"key_holder {desc.get('key_holder')!r} is not one of {cls.key_holders}")
        want = desc.get("min_clients", 1)
        if desc.get("key_holder") != "masked" and (desc.get("min_survivors") != want or not isinstance(want, int)
                                                   or want < 1):
            problems.append(f"min_survivors is {desc.get('min_survivors')!r}, expected min_clients = {want!r}")
        try:
            params.check_ring(desc["poly_modulus_degree"], desc["coeff_mod_bit_sizes"])
        except ConfigurationError as e:
            problems.append(str(e))
        except (KeyError, TypeError):
            problems.append("poly_modulus_degree and coeff_mod_bit_sizes are missing")
        return problems


def _refuse(why: str) -> ProtocolAborted:
    return ProtocolAborted(
        AbortReason.REQUEST_REFUSED,
        f"the key holder refuses to release the aggregate: {why}; a signed upload was out of range (a client "
        "encrypted a value outside value_range)",
    )


def _check_range(value_range: object) -> float:
    if not (isinstance(value_range, (int, float, np.integer, np.floating)) and not isinstance(value_range, bool)
            and math.isfinite(value_range) and value_range > 0):
        raise ConfigurationError(f"value_range must be a finite number > 0, got {value_range!r}")
    return float(value_range)


class CKKS(HEProtocol):
    """Approximate sums of real vectors under CKKS; the server cannot decrypt.

    - ``value_range``: bound c on every input coordinate (|x_i| > c is InvalidInput);
    - ``precision_bits``: the key holder releases the sum rounded to multiples of
      2^-precision_bits (default 40, about 9.1e-13), so the release hides the decryption
      noise (Li and Micciancio 2021: raw CKKS decryptions leak the secret key);
    - ``poly_modulus_degree`` N (default 8192, N/2 slots per ciphertext) and
      ``coeff_mod_bit_sizes`` (default [60, 40, 60]), checked against the 128-bit table;
    - ``key_holder``: ``"decryptor"`` or ``"clients"`` (module docstring);
    - ``identities``: a :class:`~securefed.crypto.signing.KeyDirectory` with every client's and (except
      in ``"clients"`` mode) the decryptor's (id ``0xFFFFFFFE``) key; None: a simulated PKI (simulation only);
    - ``min_clients``: the fewest uploads a round may sum (default 1): an active server can leave uploads
      out, so this is the smallest set whose sum it can learn.

    The encoding scale is derived per round: 2^(floor(log2 q) - 2 - ceil(log2(n c))), the largest
    that keeps the sum below q/4; ConfigurationError when it cannot put the noise 2^20 deviations
    below the output grid. See ``protocols/he.md`` ("CKKS parameters").
    """

    name = "ckks"
    _TAG = b"SFCK"

    def __init__(
        self,
        *,
        key_holder: KeyHolder = "decryptor",
        value_range: float = 100.0,
        precision_bits: int = 40,
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: Sequence[int] = (60, 40, 60),
        identities: KeyDirectory | None = None,
        min_clients: int = 1,
    ) -> None:
        if isinstance(key_holder, str) and key_holder == "masked":
            raise ConfigurationError("key_holder='masked' needs exact integer sums: use BFV")
        if coeff_mod_bit_sizes is None:  # None derives the primes for BFV only
            raise ConfigurationError("CKKS needs coeff_mod_bit_sizes, e.g. the default (60, 40, 60), got None")
        super().__init__(key_holder, poly_modulus_degree, coeff_mod_bit_sizes, identities, min_clients)
        self.value_range = _check_range(value_range)
        if not isinstance(precision_bits, int) or isinstance(precision_bits, bool) or not 1 <= precision_bits <= 52:
            raise ConfigurationError(f"precision_bits must be an integer in [1, 52], got {precision_bits!r}")
        self.precision_bits = precision_bits
        self._ring(1)  # fail now, not in a round, if even one client cannot be served

    def __repr__(self) -> str:
        return (f"CKKS(key_holder={self.key_holder!r}, value_range={self.value_range!r}, "
                f"precision_bits={self.precision_bits}, poly_modulus_degree={self.poly_modulus_degree}, "
                f"coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes or ())}"
                + (f", min_clients={self.min_clients})" if self.min_clients != 1 else ")"))

    def _params(self, n: int) -> params.CKKSRound:
        assert self.coeff_mod_bit_sizes is not None
        return params.ckks_round(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.value_range,
                                 self.precision_bits, n)

    def _ring(self, n: int) -> Ring:
        p = self._params(n)
        return Ring("ckks", p.poly_modulus_degree, p.coeff_mod_bit_sizes, scale_bits=p.scale_bits)

    def error_bound(self, n: int) -> float:
        """Worst-case absolute error per coordinate of the released sum of up to n inputs (proofs/he.md H3).
        ConfigurationError unless n is a positive integer."""
        return self._params(check_positive_count(n, "the number of clients")).error_bound()

    def describe(self, n: int) -> dict[str, Any]:
        p = self._params(n)
        return {
            **super().describe(n),
            "scheme": "CKKS",
            "value_range": self.value_range,
            "precision_bits": self.precision_bits,
            "scale_bits": p.scale_bits,
            "noise_bits": round(p.noise_bits, 3),
            "noise_margin_bits": params.NOISE_MARGIN_BITS,
            "error_bound": p.error_bound(),
        }

    @classmethod
    def check_description(cls, description: Mapping[str, Any]) -> list[str]:
        """Violated conditions: security table, headroom (n c 2^s <= q/4), noise margin below the grid."""
        problems = cls._check_common(description)
        try:
            n, c = int(description["n"]), float(description["value_range"])
            bits, s = description["coeff_mod_bit_sizes"], int(description["scale_bits"])
            prec, degree = int(description["precision_bits"]), int(description["poly_modulus_degree"])
        except (KeyError, TypeError, ValueError):
            return [*problems, "n, value_range, scale_bits, precision_bits or the ring is missing"]
        if problems:
            return problems
        q_bits = params.data_bits(bits)
        if s + math.ceil(math.log2(n * c)) + 2 > q_bits or s > q_bits - 2:
            problems.append(f"scale 2^{s} leaves no headroom for {n} inputs of range {c:g} below q/4 (q ~ 2^{q_bits})")
        margin = s - params.noise_bits(degree, n) - prec
        if margin < params.NOISE_MARGIN_BITS:
            problems.append(
                f"the output grid 2^-{prec} is only 2^{margin:.1f} noise deviations (need 2^{params.NOISE_MARGIN_BITS})"
            )
        return problems

    def _prepare(self, x: np.ndarray, spec: RoundSpec, rng: RandomSource) -> np.ndarray:
        x = check_vector(x, spec.dim)
        peak = float(np.max(np.abs(x)))
        if not math.isfinite(peak):
            raise InvalidInput("input contains NaN or Inf; updates must be finite")
        if peak > self.value_range:
            i = int(np.argmax(np.abs(x)))
            raise InvalidInput(
                f"input coordinate {i} is {float(x[i]):.6g}, outside the declared range [-{self.value_range:g}, "
                f"{self.value_range:g}]; clip or scale the update, or declare a larger value_range"
            )
        return np.ascontiguousarray(x, dtype=np.float64)

    def _release(self, values: np.ndarray, spec: RoundSpec, count: int) -> bytes:
        limit = count * self.value_range + self.error_bound(spec.n)
        if not np.all(np.abs(values) <= limit):  # also catches NaN
            raise _refuse(f"the decrypted sum leaves [-{limit:.6g}, {limit:.6g}], the range of {count} inputs")
        # Rounding to the public grid is what hides the decryption noise (proofs/he.md H4).
        grid = np.ldexp(np.rint(np.ldexp(values, self.precision_bits)), -self.precision_bits)
        return grid.astype("<f8", copy=False).tobytes()

    def _released_size(self, spec: RoundSpec) -> int:
        return 8 * spec.dim

    def _total(self, released: memoryview, spec: RoundSpec, count: int) -> np.ndarray:
        total = np.frombuffer(released, dtype="<f8").astype(np.float64)
        if not np.isfinite(total).all():
            raise MessageRejected("invalid message: non-finite sum")
        return total


class BFV(HEProtocol):
    """Exact integer sums under BFV: inputs are quantized (FixedPoint by default), summed exactly, decoded.

    - ``value_range``, ``value_bits``: the :class:`~securefed.encoding.FixedPoint` encoder
      (|x_i| > value_range is InvalidInput); or ``encoder=`` any
      :class:`~securefed.encoding.IntegerEncoder` (e.g. a distributed-DP mechanism);
    - the plaintext modulus t is the smallest prime = 1 (mod 2N) above n 2^k (k the encoder's
      modulus bits): the exact sum of n centered k-bit values never wraps, so reducing it mod 2^k
      gives the encoder exactly the modular sum it expects;
    - ``coeff_mod_bit_sizes``: default None derives the fewest 60-bit primes whose noise budget
      holds n summands (worst case, no failure probability);
    - ``key_holder``: ``"decryptor"``, ``"clients"`` or ``"masked"``; ``masking``: the masking
      protocol of masked mode (default ``SecAggPlus()``; its threshold and threat model apply,
      its encoder is replaced by this protocol's);
    - ``identities``, ``min_clients``: as for :class:`CKKS` (``min_clients`` not in masked mode).

    Phases: ``("setup", "keys", "upload", "decrypt", "consistency_check", "unmasking")``; the last
    two do work only in masked mode. See ``protocols/he.md`` ("BFV parameters", "Masked mode").
    """

    name = "bfv"
    phases = ("setup", "keys", "upload", "decrypt", "consistency_check", "unmasking")
    key_holders = ("decryptor", "clients", "masked")
    _TAG = b"SFBF"

    def __init__(
        self,
        *,
        value_range: float | None = None,
        value_bits: int = 16,
        encoder: IntegerEncoder | None = None,
        key_holder: KeyHolder = "decryptor",
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: Sequence[int] | None = None,
        masking: AggregationProtocol | None = None,
        identities: KeyDirectory | None = None,
        min_clients: int = 1,
    ) -> None:
        super().__init__(key_holder, poly_modulus_degree, coeff_mod_bit_sizes, identities, min_clients)
        if encoder is None:
            if value_range is None:
                raise ConfigurationError("BFV needs value_range (the bound on each input coordinate) or an encoder")
            encoder = FixedPoint(value_range=value_range, value_bits=value_bits)
        elif not isinstance(encoder, IntegerEncoder):
            raise ConfigurationError(f"encoder must be an IntegerEncoder, got {type(encoder).__name__}")
        elif value_range is not None:
            raise ConfigurationError("give either value_range/value_bits or an encoder, not both")
        self.encoder = encoder
        self._masking_given = masking
        self.masking: Any = None
        if key_holder == "masked":
            masking = SecAggPlus() if masking is None else masking
            if not isinstance(masking, MaskedAggregation):
                raise ConfigurationError(f"masking must be SecAgg or SecAggPlus, got {type(masking).__name__}")
            self.masking = masking.with_encoder(encoder)
        elif masking is not None:
            raise ConfigurationError("masking= applies to key_holder='masked' only")
        # The plaintext prime depends on n (and encoders may refuse some n): checked per round.

    def __repr__(self) -> str:
        return (f"BFV(encoder={self.encoder!r}, key_holder={self.key_holder!r}, "
                f"poly_modulus_degree={self.poly_modulus_degree}, coeff_mod_bit_sizes={self.coeff_mod_bit_sizes}"
                + (f", masking={self.masking!r}" if self.masking is not None else "")
                + (f", min_clients={self.min_clients})" if self.min_clients != 1 else ")"))

    def round_identities(self, n: int) -> KeyDirectory | None:
        """In masked mode the masking protocol's identity directory (None when it is semi-honest, or not masked)."""
        return None if self.masking is None else self.masking.round_identities(n)

    def survivor_list(self, spec: RoundSpec, request: bytes) -> np.ndarray:
        """The masking protocol's survivor list in a masked round's consistency_check `request`; MessageRejected
        for a malformed request or outside masked mode."""
        if self.masking is None:
            raise MessageRejected("invalid message: a survivor list outside masked mode")
        inner = Framer(self, spec).payload(request, "consistency_check", wire.SERVER)
        return self.masking.survivor_list(spec, bytes(inner))

    def with_encoder(self, encoder: Any) -> BFV:
        """A copy carrying `encoder`; ConfigurationError if its sums of n values cannot fit a 60-bit prime."""
        other = BFV(encoder=encoder, key_holder=self.key_holder,  # type: ignore[arg-type]
                    poly_modulus_degree=self.poly_modulus_degree, coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
                    masking=self._masking_given, identities=self.identities, min_clients=self.min_clients)
        other._simulated_pki = self._simulated_pki  # server and clients of one run must share the simulated PKI
        if self.masking is not None:  # this one's, keeping the identities a round bound to it (red team 7)
            other.masking = self.masking.with_encoder(encoder)
        return other

    def with_identities(self, identities: KeyDirectory) -> BFV:
        """As :meth:`CKKS.with_identities`; in masked mode the masking protocol gets them too."""
        other = super().with_identities(identities)
        assert isinstance(other, BFV)
        if other.masking is not None:
            other.masking = other.masking.with_identities(identities)
        return other

    def min_survivors(self, n: int) -> int:
        return super().min_survivors(n) if self.masking is None else self.masking.min_survivors(n)

    def server(self, spec: RoundSpec, *, rng: RandomSource) -> ServerProtocol:
        if self.masking is None:
            return super().server(spec, rng=rng)
        return MaskedServer(self, spec, self._ring(spec.n), rng)

    def client(
        self, spec: RoundSpec, client: int, x: np.ndarray | None = None, *, rng: RandomSource
    ) -> ClientProtocol:
        if self.masking is None:
            return super().client(spec, client, x, rng=rng)
        inner = self.masking.client(spec, client, None, rng=rng.child("masking"))
        c = MaskedClient(self, spec, self._ring(spec.n), client, inner)
        if x is not None:
            c.set_input(x)
        return c

    def _params(self, n: int) -> params.BFVRound:
        return params.bfv_round(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.encoder.modulus_bits(n), n)

    def _ring(self, n: int) -> Ring:
        p = self._params(n)
        return Ring("bfv", p.poly_modulus_degree, p.coeff_mod_bit_sizes, plain_modulus=p.plain_modulus)

    def error_bound(self, n: int) -> float:
        """The encoder's bound: BFV adds no error (proofs/he.md H2). ConfigurationError unless n >= 1."""
        return self.encoder.error_bound(check_positive_count(n, "the number of clients"))

    def describe(self, n: int) -> dict[str, Any]:
        p = self._params(n)
        out = {
            **super().describe(n),
            "scheme": "BFV",
            "plain_modulus": p.plain_modulus,
            "modulus_bits": p.modulus_bits,
            **self.encoder.describe(),
            "error_bound": self.error_bound(n),
        }
        if self.masking is not None:
            out["masking"] = self.masking.describe(n)
        return out

    @classmethod
    def check_description(cls, description: Mapping[str, Any]) -> list[str]:
        """Violated conditions: security table, t prime = 1 (mod 2N) above n 2^k, noise n B t < q/2."""
        problems = cls._check_common(description)
        try:
            n, t, k = int(description["n"]), int(description["plain_modulus"]), int(description["modulus_bits"])
            degree, bits = int(description["poly_modulus_degree"]), description["coeff_mod_bit_sizes"]
        except (KeyError, TypeError, ValueError):
            return [*problems, "n, plain_modulus, modulus_bits or the ring is missing"]
        if problems:
            return problems
        if not params.is_prime(t) or t % (2 * degree) != 1:
            problems.append(f"plain_modulus {t} is not a prime = 1 (mod {2 * degree})")
        if t <= n << k:
            problems.append(f"plain_modulus {t} does not exceed n 2^k = {n << k}: the sum could wrap")
        if t.bit_length() > params.MAX_PRIME_BITS:
            problems.append(f"plain_modulus has {t.bit_length()} bits, above {params.MAX_PRIME_BITS}")
        if not params.bfv_noise_ok(degree, bits, t, n):
            problems.append(f"coefficient moduli {list(bits)} cannot hold the noise of {n} summands")
        if description.get("key_holder") == "masked":
            problems += cls._check_masking(description)
        return problems

    @staticmethod
    def _check_masking(description: Mapping[str, Any]) -> list[str]:
        masking = description.get("masking")
        kinds: dict[str, type[MaskedAggregation]] = {"secagg": SecAgg, "secagg+": SecAggPlus}
        cls = kinds.get(masking.get("protocol", "")) if isinstance(masking, Mapping) else None
        if cls is None or not isinstance(masking, Mapping):
            return ["masked mode needs the description of its masking protocol (SecAgg or SecAggPlus)"]
        problems = [f"masking: {p}" for p in cls.check_description(masking)]
        if masking.get("min_survivors") != description.get("min_survivors"):
            problems.append("min_survivors differs from the masking protocol's threshold")
        if masking.get("n") != description.get("n") or masking.get("modulus_bits") != description.get("modulus_bits"):
            problems.append("the masking protocol's n or modulus width differs from BFV's")
        return problems

    def _prepare(self, x: np.ndarray, spec: RoundSpec, rng: RandomSource) -> np.ndarray:
        x = check_vector(x, spec.dim)
        check_finite(x)
        return self._center(self.encoder.encode(x, n=spec.n, rng=rng).astype(np.uint64), spec)

    def _center(self, s: np.ndarray, spec: RoundSpec) -> np.ndarray:
        """Values mod 2^k (uint64) as their centered representatives in [-2^(k-1), 2^(k-1)), int64."""
        k = self.encoder.modulus_bits(spec.n)
        if k == 64:
            return s.view(np.int64)
        return s.astype(np.int64) - ((s >> np.uint64(k - 1)) << np.uint64(k)).astype(np.int64)

    def _release(self, values: np.ndarray, spec: RoundSpec, count: int) -> bytes:
        k = self.encoder.modulus_bits(spec.n)
        if np.max(np.abs(values)) > count << (k - 1):
            raise _refuse(f"the decrypted sum leaves +-{count} * 2^{k - 1}, the range of {count} encodings")
        s = (values.astype(np.int64) & np.int64((1 << k) - 1)).astype(storage_dtype(k))
        return pack(s, k).tobytes()

    def _released_size(self, spec: RoundSpec) -> int:
        return (spec.dim * self.encoder.modulus_bits(spec.n) + 7) // 8

    def _total(self, released: memoryview, spec: RoundSpec, count: int) -> np.ndarray:
        k = self.encoder.modulus_bits(spec.n)
        try:
            s = unpack(released, k, spec.dim)
        except InvalidInput:
            raise MessageRejected("invalid message: malformed sum") from None
        return self.encoder.decode(s, n=spec.n, count=count)
