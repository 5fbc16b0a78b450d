"""Hazardous-materials layer: cryptographic building blocks on `cryptography`.

Users rarely need these directly; the protocol classes are the safe recipes.
Nothing here implements a cipher: AES, X25519, Ed25519, HKDF and AES-GCM all come
from pyca/cryptography.
"""
