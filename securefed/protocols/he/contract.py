"""What the HE parties, server, codec and states read of their scheme: a structural type.

The scheme (:mod:`securefed.protocols.he.scheme`: ``HEProtocol``, ``CKKS``, ``BFV``) builds the
parties and the server, so they cannot import it back without an import cycle; they are typed
against :class:`HEScheme` instead, which every ``HEProtocol`` satisfies (``MaskedScheme``: a BFV in
``key_holder="masked"`` mode).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.protocols.base import RoundSpec
from securefed.protocols.he.tenseal import Ring

__all__ = ["HEScheme", "MaskedScheme"]


class HEScheme(Protocol):
    """The scheme as its parties see it (read only); the hooks are documented on ``HEProtocol``."""

    @property
    def name(self) -> str: ...

    @property
    def phases(self) -> tuple[str, ...]: ...

    @property
    def key_holder(self) -> str: ...

    @property
    def key_holders(self) -> tuple[str, ...]: ...

    @property
    def _TAG(self) -> bytes: ...

    def directory(self, n: int) -> KeyDirectory: ...

    def min_survivors(self, n: int) -> int: ...

    def _ring(self, n: int) -> Ring: ...

    def _prepare(self, x: np.ndarray, spec: RoundSpec, rng: RandomSource) -> np.ndarray: ...

    def _release(self, values: np.ndarray, spec: RoundSpec, count: int) -> bytes: ...

    def _total(self, released: memoryview, spec: RoundSpec, count: int) -> np.ndarray: ...

    def _released_size(self, spec: RoundSpec) -> int: ...


class MaskedScheme(HEScheme, Protocol):
    """BFV with a masking protocol (SecAgg or SecAgg+) inside its plaintexts."""

    @property
    def masking(self) -> Any: ...

    @property
    def encoder(self) -> Any: ...

    def _center(self, s: np.ndarray, spec: RoundSpec) -> np.ndarray: ...
