"""Testing kit for securefed and for users' own protocols and DP modules.

==========================  =====================================================================
``check_protocol``          the conformance suite for any aggregation protocol (``conformance``)
``conformance_tests``       the same as a pytest test class, one test per property
``check_clipper``           norm bound and shape of a clipping module (``privacy``)
``check_noise``             unbiasedness, declared variance and a one-run audit of a noise module
``audit_epsilon``           one-run empirical privacy audit: a lower bound on epsilon (``privacy_audit``)
``strategies``              hypothesis strategies: updates, populations, dropouts, configurations,
                            malformed messages, deviating servers
``adversary``               a server that deviates in named ways, and what honest clients must do
``coalition``               the server with up to C corrupt clients: search for plans that unmask
                            an honest client's input, and run them end to end
``load_profile``            the ``ci`` / ``dev`` hypothesis profiles (``HYPOTHESIS_PROFILE``)
==========================  =====================================================================

Everything that draws examples needs hypothesis (``pip install 'securefed[testing]'``); it is
imported only when one of those names is first used, so ``import securefed.testing`` works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from securefed.testing.profiles import load_profile, register_profiles

if TYPE_CHECKING:
    from securefed.testing import adversary, coalition, strategies
    from securefed.testing.conformance import PROPERTIES, ConformanceError, check_protocol, conformance_tests
    from securefed.testing.privacy import check_clipper, check_noise
    from securefed.testing.privacy_audit import audit_epsilon

__all__ = [
    "PROPERTIES",
    "ConformanceError",
    "adversary",
    "audit_epsilon",
    "check_clipper",
    "check_noise",
    "check_protocol",
    "coalition",
    "conformance_tests",
    "load_profile",
    "register_profiles",
    "strategies",
]

_LAZY = {
    "PROPERTIES": "securefed.testing.conformance",
    "ConformanceError": "securefed.testing.conformance",
    "check_protocol": "securefed.testing.conformance",
    "conformance_tests": "securefed.testing.conformance",
    "check_clipper": "securefed.testing.privacy",
    "check_noise": "securefed.testing.privacy",
    "audit_epsilon": "securefed.testing.privacy_audit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("adversary", "coalition", "privacy_audit", "strategies"):
        return importlib.import_module(f"securefed.testing.{name}")
    raise AttributeError(f"module 'securefed.testing' has no attribute {name!r}")
