"""Identity keys on Flower: the round's directory, indexed by client, built from the federation's, indexed by node.

The active SecAgg variants verify every client's signatures against a
:class:`~securefed.crypto.signing.KeyDirectory` indexed by client (0..n-1). On Flower,
client i of a round is the i-th smallest node id of that round, so the index of a node
changes when participants change. Each party keeps its own copy of the federation's keys
indexed by node id (a node: every public key and its own signing key; the server: public
keys only) and builds the round's directory from it and the round's node ids; no key
ever comes from the server. See ``protocols/flower.md``, "Identities".
"""

from __future__ import annotations

from collections.abc import Sequence

from securefed.crypto.signing import KeyDirectory
from securefed.errors import ConfigurationError
from securefed.protocols.base import AggregationProtocol

__all__ = ["bind", "directory", "registered"]


def registered(federation: KeyDirectory, node: int) -> bool:
    """Whether `node` has a verification key in `federation`."""
    try:
        federation.verify_key(node)
    except ConfigurationError:
        return False
    return True


def directory(federation: KeyDirectory, nodes: Sequence[int], me: int | None = None) -> KeyDirectory:
    """The round's directory: client i has the key of node ``nodes[i]`` in `federation`; with `me` (this
    node's id) its signing key at its index. Raises ConfigurationError for a node without a key."""
    public = {i: federation.verify_key(v) for i, v in enumerate(nodes)}
    private = {} if me is None else {list(nodes).index(me): federation.signing_key(me)}
    return KeyDirectory(public, private)


def bind(protocol: AggregationProtocol, federation: KeyDirectory, nodes: Sequence[int],
         me: int | None = None) -> AggregationProtocol:
    """`protocol` using the round's directory: client i has the key of node ``nodes[i]`` in `federation`.

    `me`: this node's id (its signing key goes with its client index); None on the server.
    Raises ConfigurationError for a protocol without ``with_identities`` or a node without a key.
    """
    with_identities = getattr(protocol, "with_identities", None)
    if with_identities is None:
        raise ConfigurationError(f"protocol {protocol.name!r} takes no identity keys (identities=)")
    return with_identities(directory(federation, nodes, me))
