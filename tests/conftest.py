import os

# Nothing leaves loopback, including third-party telemetry.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from securefed.testing.profiles import load_profile

PROFILE = load_profile()


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}"


def pytest_collection_modifyitems(config, items):
    # Slow multi-process tests mostly wait on Flower's polling: start them first so that,
    # under pytest-xdist (`make test`), the other worker runs the rest of the suite meanwhile.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
