"""Importing securefed.privacy stays light: torch loads only with DPSGD (sample-level DP)."""

import subprocess
import sys


def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_importing_the_privacy_package_does_not_import_torch():
    code = ("import sys, securefed.privacy as p; print('torch' in sys.modules, 'DPSGD' in p.__all__, "
            "'DPSGD' in dir(p))")
    assert _run(code) == ["False", "True", "True"]


def test_dpsgd_still_imports_by_its_public_name_and_loads_torch_then():
    code = ("import sys; from securefed.privacy import DPSGD; import securefed.privacy.dpsgd as m; "
            "print(DPSGD is m.DPSGD, 'torch' in sys.modules)")
    assert _run(code) == ["True", "True"]


def test_client_level_configurations_and_accounting_do_not_import_torch():
    code = ("import sys, securefed as sf\n"
            "from securefed.privacy import DistributedDP, PrivacySession, Accountant\n"
            "from securefed.crypto.random import RandomSource\n"
            "s = PrivacySession(DistributedDP(noise_multiplier=1.0), protocol=sf.protocols.SecAggPlus(), population=8,"
            " clients_per_round=8, dimension=10, local_steps=1, rng=RandomSource(0))\n"
            "s.before_round(1, 8)\n"
            "print('torch' in sys.modules)")
    assert _run(code) == ["False"]
