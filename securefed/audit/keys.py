"""The server's Ed25519 audit key: kept beside the log by default, or given by the operator.

Default files for a log ``PATH``: ``PATH.key`` (PKCS#8 PEM, unencrypted, mode 0600;
keep it with the server, never with the log's readers) and ``PATH.pub``
(SubjectPublicKeyInfo PEM: hand it to the auditor out of band to pin).
See ``protocols/audit.md`` section "Keys".
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.errors import ConfigurationError

__all__ = [
    "KeyLike", "PublicKeyLike", "key_paths", "load_or_create_key", "load_public_key", "open_log", "prepare_log_path",
    "public_hex",
]

#: A private key, or a path to its PEM file.
KeyLike = Ed25519PrivateKey | str | os.PathLike[str]
#: A public key, 64 hex digits of its raw bytes, or a path to a PEM or hex file.
PublicKeyLike = Ed25519PublicKey | str | os.PathLike[str]

_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


def prepare_log_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path for an audit log, its folder created (with parents) when missing.

    Raises ConfigurationError when `path` is not a path, names a directory, or its folder
    cannot be created (a component is a file, no permission).
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ConfigurationError(f"the audit log must be a path (str or os.PathLike), got {type(path).__name__}")
    log = Path(path)
    if os.fspath(path) == "" or log.is_dir():
        raise ConfigurationError(f"the audit log {os.fspath(path)!r} is a directory; give a file in it, "
                                 f"e.g. {os.fspath(log / 'audit.jsonl')!r}")
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = next((p for p in (log.parent, *log.parent.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking is not None else (e.strerror or str(e))
        raise ConfigurationError(f"cannot create the audit log's folder {log.parent}: {why}; "
                                 "choose a folder you can write to") from e
    return log


def open_log(log: Path) -> int:
    """A file descriptor on `log` for appending (created 0644 when missing); ConfigurationError when it cannot be."""
    try:
        # No link (the writer truncates a torn tail: through a link it would cut another file), no FIFO.
        fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise ConfigurationError(f"cannot open the audit log {log} for writing: {e.strerror or e} (a link is "
                                 "refused); choose a regular file in a folder you can write to") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigurationError(f"the audit log {log} is not a regular file; choose a regular file")
    os.set_blocking(fd, True)
    return fd


def key_paths(log: Path) -> tuple[Path, Path]:
    """``(private, public)`` default key files beside the log `log`."""
    return log.with_name(log.name + ".key"), log.with_name(log.name + ".pub")


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex digits (as the log records it)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigurationError(f"cannot load the audit key {path}: {e}; give a PKCS#8 PEM Ed25519 key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"the audit key {path} is not an Ed25519 key")
    return key


def load_or_create_key(log: Path, key: KeyLike | None) -> Ed25519PrivateKey:
    """The signing key for `log`: `key` itself, the PEM file it names, or ``LOG.key``.

    Without `key`, ``LOG.key`` is loaded, or created (with ``LOG.pub``) when the log
    does not exist yet. Raises ConfigurationError when `key` is of another type, when
    the key cannot be loaded or written, or when the log exists but its key file does not.
    """
    if isinstance(key, Ed25519PrivateKey):
        return key
    if key is not None:
        if not isinstance(key, (str, os.PathLike)) or not isinstance(os.fspath(key), str):
            raise ConfigurationError(
                f"the audit key must be an Ed25519PrivateKey or the path of its PEM file, got {type(key).__name__}"
                + ("; to use PEM bytes, load them with cryptography's serialization.load_pem_private_key"
                   if isinstance(key, bytes) else ""))
        return _load_private(Path(key))
    private, public = key_paths(log)
    if private.exists():
        return _load_private(private)
    if log.exists() and log.stat().st_size > 0:
        raise ConfigurationError(
            f"the audit log {log} exists but its key {private} does not; pass the key that signed it"
        )
    new = Ed25519PrivateKey.generate()
    pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = new.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _write_new(private, pem, 0o600)
        public.unlink(missing_ok=True)
        _write_new(public, pub, 0o644)
    except OSError as e:
        raise ConfigurationError(f"cannot write the audit key {e.filename or private}: {e.strerror or e}; choose a "
                                 "folder you can write to for the audit log, or pass audit_key") from e
    return new


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, 64 hex digits, or a file holding PEM or hex.

    Raises ConfigurationError for anything else.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    text = os.fspath(key)
    if isinstance(text, str) and _HEX_KEY.match(text.strip()):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigurationError(f"--pubkey {text!r} is neither 64 hex digits nor a readable file: {e}") from e
    stripped = data.strip()
    if _HEX_KEY.match(stripped.decode("ascii", "replace")):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(stripped.decode()))
    try:
        pub = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise ConfigurationError(f"{path} holds no PEM public key or hex key") from e
    if not isinstance(pub, Ed25519PublicKey):
        raise ConfigurationError(f"{path} is not an Ed25519 public key")
    return pub
