"""Hypothesis profiles shared by securefed's suite and by users' suites.

``ci``: thorough and derandomized (the same examples on every run, so CI is
reproducible); ``dev``: fast, for local iterations. Selected by the environment
variable ``HYPOTHESIS_PROFILE`` (default ``dev``).
"""

from __future__ import annotations

import os

__all__ = ["PROFILES", "load_profile", "register_profiles"]

PROFILES = ("ci", "dev")


def _hypothesis():
    try:
        import hypothesis
    except ImportError as e:
        raise ImportError(
            "securefed.testing's hypothesis profiles need hypothesis: install the extra with "
            "pip install 'securefed[testing]'"
        ) from e
    return hypothesis


def register_profiles() -> None:
    """Register the ``ci`` and ``dev`` profiles with hypothesis."""
    hypothesis = _hypothesis()
    HealthCheck, settings = hypothesis.HealthCheck, hypothesis.settings

    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                              suppress_health_check=slow, print_blob=True)
    settings.register_profile("dev", max_examples=12, deadline=None, suppress_health_check=slow)


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load `name` (default: ``$HYPOTHESIS_PROFILE`` or ``dev``)."""
    settings = _hypothesis().settings
    register_profiles()
    name = name or os.environ.get("HYPOTHESIS_PROFILE", "dev")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE must be one of {PROFILES}, got {name!r}")
    settings.load_profile(name)
    return name
