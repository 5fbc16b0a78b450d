from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # The runtime tests seed their nodes on purpose (reproducible rounds): the SecureClient's
    # SeededSecretsWarning would repeat in every one. test_node_settings.py checks the warning itself
    # (pytest.warns and warnings.catch_warnings override this filter).
    quiet = pytest.mark.filterwarnings("ignore::securefed.errors.SeededSecretsWarning")
    for item in items:
        if item.path.resolve().parent == HERE and item.path.name != "test_node_settings.py":
            item.add_marker(quiet)
