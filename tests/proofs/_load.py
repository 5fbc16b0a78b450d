"""Load the executable proof checks in ``proofs/checks/`` (not a package: plain scripts)."""

import importlib.util
import pathlib

CHECKS = pathlib.Path(__file__).resolve().parents[2] / "proofs" / "checks"


def load_check(name: str):
    spec = importlib.util.spec_from_file_location(f"proofs_checks_{name}", CHECKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
