"""Testing kit for securefed and for users' own protocols and DP modules (needs ``securefed[testing]``)."""

from securefed.testing.profiles import load_profile, register_profiles

__all__ = ["load_profile", "register_profiles"]
