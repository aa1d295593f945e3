"""The continual-learning metrics on hand-made accuracy matrices (rows: stages 0..N, columns: tasks)."""

import math

import pytest

from selfdistill.continual.metrics import acc, bwt, forgetting, fwt, mean_ci, stream_metrics, t_quantile

# Stage 0 knows nothing; each stage learns its task perfectly and keeps everything: no forgetting.
KEEPS = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
# Each stage learns its task and loses every earlier one completely.
FORGETS = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_no_forgetting():
    assert stream_metrics(KEEPS) == {"acc": 1.0, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0}


def test_total_forgetting():
    assert acc(FORGETS) == pytest.approx(1 / 3)
    assert bwt(FORGETS) == -1.0
    assert forgetting(FORGETS) == 1.0
    assert fwt(FORGETS) == 0.0


def test_each_formula_on_an_irregular_matrix():
    R = [[0.1, 0.2, 0.3], [0.8, 0.4, 0.5], [0.6, 0.9, 0.35], [0.7, 0.5, 0.95]]
    assert acc(R) == pytest.approx((0.7 + 0.5 + 0.95) / 3)
    # BWT over tasks 1, 2: R[3][i] - R[i][i]
    assert bwt(R) == pytest.approx(((0.7 - 0.8) + (0.5 - 0.9)) / 2)
    # FWT over tasks 2, 3: R[i-1][i] - R[0][i]; task 2 after stage 1 is 0.4, task 3 after stage 2 is 0.35
    assert fwt(R) == pytest.approx(((0.4 - 0.2) + (0.35 - 0.3)) / 2)
    # Forgetting over tasks 1, 2: best of stages 0..2 minus final
    assert forgetting(R) == pytest.approx(((0.8 - 0.7) + (0.9 - 0.5)) / 2)


def test_positive_backward_transfer_gives_negative_forgetting_only_when_final_is_best():
    R = [[0.0, 0.0], [0.5, 0.0], [0.9, 1.0]]
    assert bwt(R) == pytest.approx(0.4)
    assert forgetting(R) == pytest.approx(0.5 - 0.9)


def test_single_stage_has_only_acc():
    R = [[0.2], [0.9]]
    assert stream_metrics(R) == {"acc": 0.9, "bwt": None, "fwt": None, "forgetting": None}


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError):
        acc([[0.0, 0.0], [1.0, 0.0]])  # N = 2 tasks needs 3 rows


def test_mean_ci_uses_student_t_and_is_null_with_one_seed():
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and one["ci95"] is None and one["n"] == 1
    values = [0.2, 0.4, 0.6]
    result = mean_ci(values)
    half = 4.303 * 0.2 / math.sqrt(3)  # sd of (0.2, 0.4, 0.6) is 0.2; t(0.975, df=2) = 4.303
    assert result["mean"] == pytest.approx(0.4)
    assert result["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert t_quantile(1000) == 1.96


def test_mean_ci_skips_undefined_values():
    assert mean_ci([None, None])["mean"] is None
    assert mean_ci([None, 1.0])["mean"] == 1.0
