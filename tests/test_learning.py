"""Every configuration learns: the matrix of tests/learning_matrix.py, in one process and in two.

One process: each case in-process (about 0.5 s each). Two processes: all cases in one torchrun
launch of tests/distributed_worker.py (FSDP2 on gloo), each checked for learning and against the
one-process run of the same case.
"""

import pytest
from learning_matrix import cases, check_learned, run_case, write_inputs
from test_distributed import launch, result

CASES = cases()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("learning-inputs"))


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    """Every case's outcome, or the error that ended it (a run that trains nothing fails with RunFailed)."""
    from selfdistill.errors import RunFailed

    root = tmp_path_factory.mktemp("learning-one")
    outcomes = {}
    for case in CASES:
        try:
            outcomes[case["name"]] = run_case(case, inputs, root / case["name"])
        except RunFailed as failed:
            outcomes[case["name"]] = failed
    return outcomes


def test_the_matrix_covers_every_registered_method_lora_and_teacher_kind():
    from selfdistill.registry import METHODS

    names = {c["name"] for c in CASES}
    assert {c["method"] for c in CASES} == set(METHODS)
    assert {"sdft-full-ema", "sdft-full-frozen", "sdft-full-live", "sdft-lora-frozen"} <= names
    assert {"offline_distill-lora-frozen-divergence", "sft_reinvoke-lora-frozen", "cpt-lora"} <= names
    assert all(any(c["method"] == m and c["lora"] for c in CASES) for m in METHODS)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_configuration_learns_in_one_process(case, one_process):
    outcome = one_process[case["name"]]
    if isinstance(outcome, Exception):
        pytest.fail(f"{case['name']}: {outcome}")
    check_learned(case, outcome)


@pytest.mark.distributed
def test_every_configuration_learns_in_two_processes_as_in_one(inputs, one_process, tmp_path):
    launch(tmp_path, {"mode": "learning", "inputs": str(inputs), "cases": [c["name"] for c in CASES]}, 2)
    outcome = result(tmp_path)
    assert outcome["world_size"] == 2
    two = {o["name"]: o for o in outcome["outcomes"]}
    assert two.keys() == {c["name"] for c in CASES}
    for case in CASES:
        check_learned(case, two[case["name"]])
        one_losses = [m["loss"] for m in one_process[case["name"]]["metrics"]]
        two_losses = [m["loss"] for m in two[case["name"]]["metrics"]]
        assert two_losses == pytest.approx(one_losses, rel=1e-3, abs=1e-5), case["name"]
