"""check_protocol on every shipped protocol under fixed random hypothesis seeds (issue 18, part 6).

The ``ci`` profile is derandomized: every run draws the same examples, so a property that fails
once in ten randomized runs (the kit's ReplayOldShares false positive did) never shows in CI. Here
each protocol runs under SEEDS, random draws that stay fixed so CI stays reproducible
(``check_protocol(..., seed=)``: not derandomized), with few examples per property.
Extend PROTOCOLS (name: (factory, options)) to cover more variants.
"""

import logging

import pytest

from securefed.protocols import BFV, CKKS, Plain, SecAgg, SecAggPlus
from securefed.testing import ConformanceError, check_protocol
from tests.testing.test_broken_protocols import AnswersBothSecrets
from tests.testing.test_conformance import he_decryptor_liveness, secagg_plus_liveness, survivors_at_least_t

logging.getLogger("securefed.protocols.secagg").setLevel(logging.ERROR)  # the simulated-PKI warning

#: Drawn once from os.urandom (secrets.randbits(32)), then fixed.
SEEDS = (4070619314, 3607350891, 2500655205, 1142740565, 4226235360)

EXAMPLES = 3
HE = dict(clients=(1, 3), dimension=(1, 3), deterministic_view=False, max_examples=2,
          must_finish=he_decryptor_liveness)

PROTOCOLS = {
    "plain": (Plain, dict(unprotected=True)),
    "secagg": (SecAgg, dict(must_finish=survivors_at_least_t(SecAgg()))),
    "secagg+": (SecAggPlus, dict(clients=(3, 7), must_finish=secagg_plus_liveness(SecAggPlus()))),
    "secagg-active": (lambda: SecAgg(adversary="active"),
                      dict(must_finish=survivors_at_least_t(SecAgg(adversary="active")))),
    "secagg+-active": (lambda: SecAggPlus(adversary="active"),
                       dict(clients=(5, 7), must_finish=secagg_plus_liveness(SecAggPlus(adversary="active")))),
    "ckks": (CKKS, HE),
    "bfv": (lambda: BFV(value_range=1.0), HE),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_shipped_protocols_pass_under_random_seeds(name, seed):
    factory, options = PROTOCOLS[name]
    check_protocol(factory, seed=seed, **{"max_examples": EXAMPLES, **options})


def test_a_seed_reproduces_a_randomized_run():
    """The same seed draws the same examples: a broken protocol fails with the same counterexample twice."""
    def failure(seed):
        with pytest.raises(ConformanceError) as info:
            check_protocol(AnswersBothSecrets, properties=["honest_client"], max_examples=40, seed=seed)
        return str(info.value)

    assert failure(SEEDS[0]) == failure(SEEDS[0])
