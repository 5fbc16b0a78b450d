import os

# Nothing leaves loopback, including third-party telemetry.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from securefed.testing.profiles import load_profile  # noqa: E402

PROFILE = load_profile()


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}"
