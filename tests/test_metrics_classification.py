"""Slice-classification metrics (``classification_report``), checked against hand computations
and the SSM paper's published confusion matrix (spec §9.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctlesion.metrics import classification_report, format_report

NAMES3 = ["Normal", "CP", "COVID-19"]

#: SSM README / paper 001/003 (R18**, augmented): rows true Normal/CP/COVID, columns predicted.
SSM_CM = np.array([[9322, 123, 5], [174, 7139, 82], [27, 277, 4042]])


def expand(cm) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix -> (y_true, y_pred) with cm[i, j] samples of (true i, predicted j)."""
    cm = np.asarray(cm)
    c = cm.shape[0]
    y_true = np.repeat(np.repeat(np.arange(c), c), cm.ravel())
    y_pred = np.repeat(np.tile(np.arange(c), c), cm.ravel())
    return y_true, y_pred


# --------------------------------------------------------------------------------------
# the paper check
# --------------------------------------------------------------------------------------
def test_ssm_paper_confusion_matrix_paper_weights():
    y_true, y_pred = expand(SSM_CM)
    r = classification_report(y_true, y_pred, NAMES3, class_weights="paper")
    assert r["confusion_matrix"] == SSM_CM.tolist()
    assert r["num_samples"] == 21191
    assert r["support"] == {"Normal": 9450, "CP": 7395, "COVID-19": 4346}
    assert round(r["f1_weighted"], 4) == 0.9676
    assert round(r["overall_accuracy"], 4) == 0.9675
    assert round(r["sensitivity"]["Normal"], 4) == 0.9865
    assert round(r["sensitivity"]["CP"], 4) == 0.9654
    # 4042 / 4346 = 0.930051, which rounds to 0.9301 at 4 decimals; the paper prints 93.00 %.
    assert r["sensitivity"]["COVID-19"] == pytest.approx(0.9300, abs=1e-4)
    assert r["sensitivity"]["COVID-19"] == pytest.approx(4042 / 4346, rel=1e-12)
    assert r["f1_weights"] == {"Normal": 0.45, "CP": 0.35, "COVID-19": 0.20}
    assert r["f1_weights_source"] == "paper"


def test_ssm_paper_confusion_matrix_exact_shares():
    """Default weights = exact test shares; expected value computed here from the matrix."""
    y_true, y_pred = expand(SSM_CM)
    r = classification_report(y_true, y_pred, NAMES3)
    cm = SSM_CM.astype(np.float64)
    tp = np.diag(cm)
    rows, cols = cm.sum(axis=1), cm.sum(axis=0)
    sens, ppv = tp / rows, tp / cols
    f1 = 2 * sens * ppv / (sens + ppv)
    shares = rows / cm.sum()
    expected = float(np.sum(shares * f1))
    assert r["f1_weighted"] == pytest.approx(expected, abs=1e-12)
    assert round(expected, 4) == 0.9675  # 0.967476: the exact-share version
    assert r["f1_weights_source"] == "test shares"
    assert [r["f1_weights"][n] for n in NAMES3] == pytest.approx(shares.tolist())
    assert [round(w, 4) for w in r["f1_weights"].values()] == [0.4459, 0.3490, 0.2051]
    assert [r["f1"][n] for n in NAMES3] == pytest.approx(f1.tolist())
    assert [r["ppv"][n] for n in NAMES3] == pytest.approx(ppv.tolist())
    assert r["f1_macro"] == pytest.approx(float(f1.mean()))


# --------------------------------------------------------------------------------------
# hand-made cases
# --------------------------------------------------------------------------------------
def test_perfect_prediction():
    y = [0, 1, 2, 2, 1, 0, 0]
    r = classification_report(y, y, NAMES3, scores=np.eye(3)[y])
    assert r["confusion_matrix"] == [[3, 0, 0], [0, 2, 0], [0, 0, 2]]
    for key in ("sensitivity", "ppv", "f1", "roc_auc"):
        assert r[key] == {n: 1.0 for n in NAMES3}
    assert r["overall_accuracy"] == 1.0
    assert r["f1_weighted"] == pytest.approx(1.0)
    assert r["f1_macro"] == 1.0
    assert r["roc_auc_macro"] == 1.0


@pytest.mark.filterwarnings("error")
def test_class_never_predicted_has_ppv_none():
    # CP has 2 true samples, never predicted; no UndefinedMetricWarning may escape.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 2, 2, 2]
    r = classification_report(y_true, y_pred, NAMES3)
    assert r["confusion_matrix"] == [[2, 0, 0], [1, 0, 1], [0, 0, 2]]
    assert r["ppv"]["CP"] is None
    assert r["sensitivity"]["CP"] == 0.0
    assert r["f1"]["CP"] == 0.0  # 2TP/(2TP+FP+FN) = 0/2: defined, and 0
    assert r["ppv"]["Normal"] == pytest.approx(2 / 3)
    assert r["f1"]["Normal"] == pytest.approx(0.8)
    assert r["f1_weighted"] == pytest.approx((0.8 + 0.0 + 0.8) / 3)
    assert r["f1_macro"] == pytest.approx((0.8 + 0.0 + 0.8) / 3)


@pytest.mark.filterwarnings("error")
def test_class_absent_from_y_true_has_sensitivity_none():
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]  # COVID predicted once, never true
    r = classification_report(y_true, y_pred, NAMES3)
    assert r["support"]["COVID-19"] == 0
    assert r["sensitivity"]["COVID-19"] is None
    assert r["ppv"]["COVID-19"] == 0.0
    assert r["f1"]["COVID-19"] == 0.0
    assert r["f1_weights"]["COVID-19"] == 0.0
    assert r["f1_weighted"] == pytest.approx(0.5 * (2 / 3) + 0.5 * 1.0)
    assert r["f1_macro"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


@pytest.mark.filterwarnings("error")
def test_class_absent_everywhere():
    r = classification_report([0, 1, 0], [0, 1, 1], NAMES3)
    assert r["sensitivity"]["COVID-19"] is None
    assert r["ppv"]["COVID-19"] is None
    assert r["f1"]["COVID-19"] is None
    # share weight 0: still defined; macro over the two defined classes
    assert r["f1_weighted"] == pytest.approx((2 / 3) * (2 / 3) + (1 / 3) * (2 / 3))
    assert r["f1_macro"] == pytest.approx(2 / 3)
    # a non-zero weight on an undefined F1 makes the weighted sum undefined
    assert classification_report([0, 1, 0], [0, 1, 1], NAMES3, "paper")["f1_weighted"] is None
    r0 = classification_report([0, 1, 0], [0, 1, 1], NAMES3, [0.5, 0.5, 0.0])
    assert r0["f1_weighted"] == pytest.approx(2 / 3)


def test_two_classes_ictcf_style():
    names = ["negative", "covid"]
    y_true = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    y_pred = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    r = classification_report(y_true, y_pred, names, class_weights=[0.715, 0.285])
    assert r["confusion_matrix"] == [[5, 1], [1, 3]]
    assert r["sensitivity"] == pytest.approx({"negative": 5 / 6, "covid": 3 / 4})
    assert r["ppv"] == pytest.approx({"negative": 5 / 6, "covid": 3 / 4})
    assert r["f1_weighted"] == pytest.approx(0.715 * 5 / 6 + 0.285 * 3 / 4)
    assert r["overall_accuracy"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="3 classes"):
        classification_report(y_true, y_pred, names, class_weights="paper")


def test_weights_are_not_renormalised():
    y_true, y_pred = [0, 1, 2, 2], [0, 1, 2, 1]
    r = classification_report(y_true, y_pred, NAMES3, class_weights=(1.0, 1.0, 1.0))
    f1 = r["f1"]
    assert r["f1_weighted"] == pytest.approx(f1["Normal"] + f1["CP"] + f1["COVID-19"])
    assert r["f1_weighted"] > 1.0


def count_pairs_auc(pos_scores, neg_scores) -> float:
    """AUC = P(score_pos > score_neg) + 0.5 P(tie), over all positive/negative pairs."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos_scores for n in neg_scores)
    return wins / (len(pos_scores) * len(neg_scores))


def test_roc_auc_one_vs_rest_by_counting_pairs():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.4, 0.3],
            [0.5, 0.4, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.2, 0.6],
            [0.3, 0.4, 0.3],
        ]
    )
    y_pred = scores.argmax(axis=1)
    r = classification_report(y_true, y_pred, NAMES3, scores=scores)
    # Normal: positives 0.7, 0.3 vs negatives 0.5, 0.1, 0.2, 0.3 -> (4 + 2 + 0.5 tie) / 8
    expected = {}
    for k, name in enumerate(NAMES3):
        pos = scores[y_true == k, k]
        neg = scores[y_true != k, k]
        expected[name] = count_pairs_auc(pos, neg)
    assert expected["Normal"] == pytest.approx(6.5 / 8)
    assert r["roc_auc"] == pytest.approx(expected)
    assert r["roc_auc_macro"] == pytest.approx(np.mean(list(expected.values())))
    sk = roc_auc_score(y_true, scores, multi_class="ovr", average="macro")
    assert r["roc_auc_macro"] == pytest.approx(sk)


def test_roc_auc_none_without_both_label_values():
    y_true = [0, 0, 1, 1]
    scores = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    r = classification_report(y_true, scores.argmax(1), NAMES3, scores=scores)
    assert r["roc_auc"]["COVID-19"] is None
    assert r["roc_auc"]["Normal"] == pytest.approx(count_pairs_auc([0.9, 0.4], [0.2, 0.6]))
    assert r["roc_auc_macro"] == pytest.approx(
        (r["roc_auc"]["Normal"] + r["roc_auc"]["CP"]) / 2
    )


def test_without_scores_auc_is_none():
    r = classification_report([0, 1], [0, 1], ["a", "b"])
    assert r["roc_auc"] is None and r["roc_auc_macro"] is None


def test_report_is_json_serialisable_and_accepts_tensors():
    y_true = torch.tensor([0, 1, 2, 1])
    y_pred = torch.tensor([0, 1, 1, 1])
    scores = torch.softmax(torch.randn(4, 3), dim=1)
    r = classification_report(y_true, y_pred, NAMES3, scores=scores)
    assert json.loads(json.dumps(r)) == r
    assert r == classification_report(
        y_true.numpy().tolist(), y_pred.numpy().tolist(), NAMES3, scores=scores.numpy()
    )


def test_format_report():
    y_true, y_pred = expand(SSM_CM)
    text = format_report(classification_report(y_true, y_pred, NAMES3, class_weights="paper"))
    for needle in ("Normal", "CP", "COVID-19", "98.65", "96.54", "93.01", "96.75", "96.76"):
        assert needle in text
    text = format_report(classification_report([0, 0], [0, 0], ["a", "b"], scores=[[1, 0], [1, 0]]))
    assert "-" in text and "AUC" in text


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(y_true=[0, 1], y_pred=[0]), "y_true has 2 entries but y_pred has 1"),
        (dict(y_true=[], y_pred=[]), "empty"),
        (dict(y_true=[0, 3], y_pred=[0, 1]), r"y_true\[1\] = 3 is out of range"),
        (dict(y_true=[0, 1], y_pred=[-1, 1]), r"y_pred\[0\] = -1 is out of range"),
        (dict(y_true=[0, 0.5], y_pred=[0, 1]), "non-integral"),
        (dict(y_true=[[0, 1, 0]], y_pred=[[0, 1, 0]]), "1-D"),
        (dict(y_true=[0, 1], y_pred=[0, 1], scores=np.zeros((2, 2))), r"shape \[n, C\] = \[2, 3\]"),
        (dict(y_true=[0, 1], y_pred=[0, 1], scores=np.zeros((3, 3))), "shape"),
        (dict(y_true=[0, 1], y_pred=[0, 1], scores=[[np.nan, 0, 1], [0, 1, 0]]), "NaN"),
        (dict(y_true=[0, 1], y_pred=[0, 1], class_weights=[0.5, 0.5]), "2 entries but there are 3"),
        (dict(y_true=[0, 1], y_pred=[0, 1], class_weights=[0.5, -0.1, 0.6]), "non-negative"),
        (dict(y_true=[0, 1], y_pred=[0, 1], class_weights="papers"), "'paper'"),
        (dict(y_true=[0, 1], y_pred=[0, 1], class_names=["a", "a", "b"]), "distinct"),
        (dict(y_true=[0, 0], y_pred=[0, 0], class_names=["a"]), "at least 2"),
    ],
)
def test_input_validation(kwargs, match):
    kwargs.setdefault("class_names", NAMES3)
    with pytest.raises(ValueError, match=match):
        classification_report(**kwargs)
