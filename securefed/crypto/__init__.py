"""Hazardous-materials layer: cryptographic building blocks on `cryptography`.

Users rarely need these directly; the protocol classes are the safe recipes.
Nothing here implements a cipher: AES, X25519, Ed25519, HKDF and AES-GCM all come
from pyca/cryptography.

- :mod:`~securefed.crypto.random`: per-party CSPRNG (AES-CTR), seeded in simulation only;
- :mod:`~securefed.crypto.prg`: AES-CTR keystream into preallocated buffers;
- :mod:`~securefed.crypto.masks`: pseudorandom masks added/subtracted in place, pairwise sign rule;
- :mod:`~securefed.crypto.kex`: X25519 + HKDF-SHA256 bound to purpose, session and both parties;
- :mod:`~securefed.crypto.aead`: AES-GCM sealed messages with associated data (sender, recipient, round, session);
- :mod:`~securefed.crypto.signing`: Ed25519 with purpose separation, and the PKI (:class:`KeyDirectory`);
- :mod:`~securefed.crypto.shamir`: t-of-n Shamir sharing of short secrets over GF(2^31 - 1).
"""
