"""Tests for see_ray.core.metrics against hand-computed numbers."""

import pytest

from see_ray.core.metrics import (
    average_performance,
    backward_transfer,
    false_rejection_rate,
    forgetting_rate,
    mean_rouge_l,
    ood_rejection_rate,
    plot_confusion,
    plot_score_matrix,
    rouge_l,
    routing_accuracy,
    routing_confusion,
    summarize,
)

# ---------------------------------------------------------------------------
# Score matrix summaries
# ---------------------------------------------------------------------------

# Forgetting matrix (task scores drop after later stages):
#   stage 0: [80, -,  - ]
#   stage 1: [70, 60, - ]
#   stage 2: [65, 55, 90]
# AP   = (65 + 55 + 90) / 3                       = 70
# BWT  = ((65 - 80) + (55 - 60)) / 2 = (-15 - 5)/2 = -10
# F.Ra = ((max(80, 70) - 65) + (60 - 55)) / 2
#      = (15 + 5) / 2                              = 10
R_FORGET = [
    [80.0, None, None],
    [70.0, 60.0, None],
    [65.0, 55.0, 90.0],
]

# Matrix where the peak on task 0 comes at stage 1, not at stage 0, so F.Ra
# is not simply -BWT:
#   stage 0: [50, -,  - ]
#   stage 1: [70, 40, - ]
#   stage 2: [60, 45, 90]
# AP   = (60 + 45 + 90) / 3                     = 65
# BWT  = ((60 - 50) + (45 - 40)) / 2 = (10+5)/2  = 7.5
# F.Ra = ((max(50, 70) - 60) + (40 - 45)) / 2
#      = (10 - 5) / 2                            = 2.5
R_PEAK = [
    [50.0, None, None],
    [70.0, 40.0, None],
    [60.0, 45.0, 90.0],
]


def test_forgetting_matrix():
    assert average_performance(R_FORGET) == pytest.approx(70.0)
    assert backward_transfer(R_FORGET) == pytest.approx(-10.0)
    assert forgetting_rate(R_FORGET) == pytest.approx(10.0)


def test_peak_matrix_fra_uses_max_over_earlier_stages():
    assert average_performance(R_PEAK) == pytest.approx(65.0)
    assert backward_transfer(R_PEAK) == pytest.approx(7.5)
    assert forgetting_rate(R_PEAK) == pytest.approx(2.5)


def test_full_matrix_upper_entries_are_ignored():
    # Upper-triangle entries (evaluated before training) must not change F.Ra:
    # R[0][1] = 99 would raise the max for task 1 if it were (wrongly) counted.
    # 2x2: AP = (30 + 50)/2 = 40; BWT = 30 - 40 = -10; F.Ra = 40 - 30 = 10.
    R = [[40.0, 99.0], [30.0, 50.0]]
    assert summarize(R) == pytest.approx({"ap": 40.0, "bwt": -10.0, "fra": 10.0})


def test_single_task_bwt_fra_none():
    R = [[42.0]]
    assert average_performance(R) == pytest.approx(42.0)
    assert backward_transfer(R) is None
    assert forgetting_rate(R) is None
    assert summarize(R) == {"ap": pytest.approx(42.0), "bwt": None, "fra": None}


def test_summarize_keys():
    out = summarize(R_FORGET)
    assert set(out) == {"ap", "bwt", "fra"}
    assert out["ap"] == pytest.approx(70.0)
    assert out["bwt"] == pytest.approx(-10.0)
    assert out["fra"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    "bad",
    [
        [],  # empty
        [[80.0, None], [None, 60.0]],  # missing R[1][0]
        [[None, None], [70.0, 60.0]],  # missing R[0][0]
        [[80.0, None, None], [70.0, 60.0, None]],  # not square (2 rows of 3)
        [[80.0], [70.0, 60.0]],  # ragged row
    ],
)
def test_incomplete_matrix_raises(bad):
    for fn in (average_performance, backward_transfer, forgetting_rate, summarize):
        with pytest.raises(ValueError):
            fn(bad)


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------


def test_rouge_identical_and_disjoint():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("alpha beta gamma", ["delta epsilon"]) == pytest.approx(0.0)


def test_rouge_empty_prediction_is_zero():
    assert rouge_l("", ["anything"]) == 0.0
    assert rouge_l("   ", ["anything"]) == 0.0


def test_rouge_partial_and_best_of_references():
    # "the cat sat" vs "the cat sat on the mat": LCS = 3 tokens,
    # P = 3/3, R = 3/6, F = 2*1*0.5/1.5 = 2/3 -> 66.67 points.
    partial = rouge_l("the cat sat", ["the cat sat on the mat"])
    assert partial == pytest.approx(200.0 / 3.0)
    # Best over references: a disjoint reference does not lower the score,
    # and an exact one lifts it to 100 regardless of order.
    assert rouge_l("the cat sat", ["dog runs", "the cat sat on the mat"]) == pytest.approx(200.0 / 3.0)
    assert rouge_l("the cat sat", ["the cat sat on the mat", "the cat sat", "x"]) == pytest.approx(100.0)


def test_rouge_uses_stemmer():
    # With the Porter stemmer "cats" ~ "cat" and "running" ~ "run".
    assert rouge_l("cats running", ["cat run"]) == pytest.approx(100.0)


def test_mean_rouge():
    # (100 + 0 + 66.67) / 3 = 55.56
    preds = ["a b c", "x", "the cat sat"]
    refs = [["a b c"], ["y"], ["the cat sat on the mat"]]
    assert mean_rouge_l(preds, refs) == pytest.approx((100.0 + 0.0 + 200.0 / 3.0) / 3.0)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])


# ---------------------------------------------------------------------------
# Routing and OOD
# ---------------------------------------------------------------------------


def test_routing_confusion_and_accuracy():
    true = ["t1", "t1", "t1", "t2", "t2", "t3"]
    routed = ["t1", "t2", "base", "t2", "t2", "t3"]
    out = routing_confusion(true, routed, ["t1", "t2", "t3"])
    assert out["labels"] == ["t1", "t2", "t3", "base"]
    #                 t1 t2 t3 base
    assert out["matrix"] == [
        [1, 1, 0, 1],  # t1: once right, once to t2, once to base
        [0, 2, 0, 0],  # t2: both right
        [0, 0, 1, 0],  # t3: right
        [0, 0, 0, 0],  # no OOD queries given
    ]
    # 4 of 6 answered by their own expert.
    assert routing_accuracy(true, routed) == pytest.approx(4 / 6)


def test_routing_confusion_rejects_unknown_names():
    with pytest.raises(ValueError):
        routing_confusion(["t1"], ["t9"], ["t1"])
    with pytest.raises(ValueError):
        routing_confusion(["t1", "t1"], ["t1"], ["t1"])


def test_ood_and_false_rejection():
    # OOD: 3 of 4 reached base -> 0.75.
    assert ood_rejection_rate(["base", "t1", "base", "base"]) == pytest.approx(0.75)
    # In-distribution: 1 of 5 reached base -> 0.2.
    assert false_rejection_rate(["t1", "t2", "base", "t1", "t3"]) == pytest.approx(0.2)
    assert ood_rejection_rate([]) == 0.0


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_score_matrix_writes_png(tmp_path):
    path = tmp_path / "scores.png"
    plot_score_matrix(R_FORGET, ["t1", "t2", "t3"], "SEE scores", str(path))
    data = path.read_bytes()
    assert len(data) > 100
    assert data.startswith(PNG_MAGIC)


def test_plot_confusion_writes_png(tmp_path):
    conf = routing_confusion(["t1", "t2", "t2"], ["t1", "t2", "base"], ["t1", "t2"])
    path = tmp_path / "confusion.png"
    plot_confusion(conf, "routing", str(path))
    data = path.read_bytes()
    assert len(data) > 100
    assert data.startswith(PNG_MAGIC)
