"""Homomorphic aggregation, CKKS and BFV through TenSEAL: one package, spec ``protocols/he.md``.

==========  ===============================================================
scheme      ``CKKS``, ``BFV`` and their shared base ``HEProtocol``
parties     the client and decryptor state machines
masked      BFV with SecAgg+ masks inside the plaintext (``key_holder="masked"``)
server      the server: adds ciphertexts, asks the key holder for one sum
auth        signatures and the key holder's verified sum
wire        framing of HE messages (``Framer``, ``Reader``) inside the common header
state       the saved-state format of the parties
params      the ring parameter rules
contract    ``HEScheme``: what the modules above read of their scheme (typing only)
tenseal     every TenSEAL call
==========  ===============================================================
"""

from securefed.protocols.he.scheme import BFV, CKKS, HEProtocol, KeyHolder

__all__ = ["BFV", "CKKS", "HEProtocol", "KeyHolder"]
