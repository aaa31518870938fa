"""Patient-level aggregation of slice probabilities (``patient_verdict``, ``group_by_patient``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctlesion.metrics import group_by_patient, patient_verdict

NAMES3 = ["Normal", "CP", "COVID-19"]
NORMAL = [0.9, 0.05, 0.05]
COVID = [0.1, 0.1, 0.8]
CP = [0.2, 0.7, 0.1]


def stack(*parts: tuple[list[float], int]) -> np.ndarray:
    return np.array([row for row, count in parts for _ in range(count)], dtype=np.float64)


# (slices, expected verdict per method: mean, abnormal_fraction, max)
CASES = {
    # 80 normal + 20 COVID slices: the mean is dominated by normal slices.
    "80 normal + 20 covid": (stack((NORMAL, 80), (COVID, 20)), ("Normal", "COVID-19", "COVID-19")),
    # one confident COVID slice in 100: only "max" reacts.
    "99 normal + 1 covid": (stack((NORMAL, 99), (COVID, 1)), ("Normal", "Normal", "COVID-19")),
    # uncertain COVID everywhere: argmax COVID, but no slice above 0.5.
    "all uncertain covid": (stack(([0.3, 0.2, 0.5], 10),), ("COVID-19", "COVID-19", "Normal")),
    # abnormal slices split between CP and COVID, Normal still the largest mean entry among them.
    "split abnormal": (
        stack((NORMAL, 5), ([0.45, 0.5, 0.05], 2), ([0.45, 0.05, 0.5], 1)),
        ("Normal", "CP", "Normal"),
    ),
    "all normal": (stack((NORMAL, 30),), ("Normal", "Normal", "Normal")),
    "all cp": (stack((CP, 7),), ("CP", "CP", "CP")),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m, method", list(enumerate(["mean", "abnormal_fraction", "max"])))
def test_methods_on_hand_made_patients(case, m, method):
    probs, expected = CASES[case]
    v = patient_verdict(probs, NAMES3, method=method)
    assert v["class"] == expected[m]
    assert v["class_index"] == NAMES3.index(expected[m])
    assert v["method"] == method
    assert v["num_slices"] == probs.shape[0]
    assert v["abnormal_slices"] == int((probs.argmax(1) != 0).sum())
    assert set(v["probabilities"]) == set(NAMES3)


def test_probabilities_reported_per_method():
    probs = stack((NORMAL, 80), (COVID, 20))
    mean = patient_verdict(probs, NAMES3, method="mean")
    assert mean["probabilities"] == pytest.approx(
        {"Normal": 0.74, "CP": 0.06, "COVID-19": 0.2}
    )
    frac = patient_verdict(probs, NAMES3, method="abnormal_fraction")
    # mean over the 20 COVID slices, normal dropped, renormalised: (0.1, 0.8) / 0.9
    assert frac["probabilities"] == pytest.approx(
        {"Normal": 0.0, "CP": 0.1 / 0.9, "COVID-19": 0.8 / 0.9}
    )
    assert frac["abnormal_slices"] == 20
    assert frac["abnormal_fraction"] == pytest.approx(0.2)
    mx = patient_verdict(probs, NAMES3, method="max")
    assert mx["probabilities"] == pytest.approx({"Normal": 0.9, "CP": 0.1, "COVID-19": 0.8})
    # a Normal abnormal_fraction verdict reports the mean over all slices
    few = patient_verdict(stack((NORMAL, 99), (COVID, 1)), NAMES3, method="abnormal_fraction")
    assert few["class"] == "Normal"
    assert few["probabilities"]["Normal"] == pytest.approx((99 * 0.9 + 0.1) / 100)


def test_default_method_is_mean():
    assert patient_verdict(stack((NORMAL, 80), (COVID, 20)), NAMES3)["method"] == "mean"


@pytest.mark.parametrize(
    "abnormal, min_fraction, expected",
    [
        (10, 0.1, "COVID-19"),  # exactly at the threshold: abnormal
        (9, 0.1, "Normal"),
        (11, 0.1, "COVID-19"),
        (0, 0.0, "Normal"),  # no abnormal slice at all is always Normal
        (1, 0.0, "COVID-19"),
        (100, 1.0, "COVID-19"),
        (99, 1.0, "Normal"),
        (30, 0.25, "COVID-19"),
        (24, 0.25, "Normal"),
    ],
)
def test_abnormal_fraction_threshold_edges(abnormal, min_fraction, expected):
    probs = stack((NORMAL, 100 - abnormal), (COVID, abnormal))
    v = patient_verdict(
        probs, NAMES3, method="abnormal_fraction", min_abnormal_fraction=min_fraction
    )
    assert v["class"] == expected
    assert v["abnormal_slices"] == abnormal


@pytest.mark.parametrize(
    "covid_p, expected",
    [(0.5, "Normal"), (0.500001, "COVID-19"), (0.49, "Normal"), (0.9, "COVID-19")],
)
def test_max_threshold_is_strictly_above_half(covid_p, expected):
    rest = 1.0 - covid_p
    probs = stack((NORMAL, 50), ([rest / 2 + 0.0, rest / 2, covid_p], 1))
    assert patient_verdict(probs, NAMES3, method="max")["class"] == expected


def test_max_picks_largest_non_normal_class():
    probs = stack((NORMAL, 10), ([0.1, 0.6, 0.3], 1), ([0.1, 0.2, 0.7], 1))
    v = patient_verdict(probs, NAMES3, method="max")
    assert v["class"] == "COVID-19"
    assert v["probabilities"]["CP"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "method, expected",
    [("mean", "negative"), ("abnormal_fraction", "covid"), ("max", "covid")],
)
def test_two_classes(method, expected):
    names = ["negative", "covid"]
    probs = stack(([0.95, 0.05], 85), ([0.2, 0.8], 15))
    v = patient_verdict(probs, names, method=method)
    assert v["class"] == expected
    if method == "abnormal_fraction":
        assert v["probabilities"] == {"negative": 0.0, "covid": 1.0}


def test_normal_class_by_name_and_index():
    names = ["COVID-19", "CP", "Normal"]  # normal class last
    probs = stack(([0.05, 0.05, 0.9], 80), ([0.8, 0.1, 0.1], 20))
    a = patient_verdict(probs, names, method="abnormal_fraction", normal_class="Normal")
    b = patient_verdict(probs, names, method="abnormal_fraction", normal_class=2)
    assert a == b
    assert a["class"] == "COVID-19"
    assert a["abnormal_slices"] == 20


def test_tensor_and_single_slice_inputs():
    probs = torch.tensor([[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]], dtype=torch.float16)
    assert patient_verdict(probs, NAMES3)["num_slices"] == 2
    one = patient_verdict(np.array(COVID), NAMES3, method="abnormal_fraction")
    assert one["num_slices"] == 1 and one["class"] == "COVID-19"


@pytest.mark.parametrize(
    "probs, kwargs, match",
    [
        (np.zeros((0, 3)), {}, "empty"),
        ([], {}, r"\[S, C\]"),
        (np.full((4, 2), 0.5), {}, "2 columns but there are 3"),
        (np.array([[np.nan, 0.5, 0.5]]), {}, "NaN"),
        (np.array([[2.0, -1.0, 0.0]]), {}, r"\[0, 1\]"),
        (np.array([[0.5, 0.2, 0.1]]), {}, "sum to"),
        (np.array([NORMAL]), {"method": "median"}, "unknown method"),
        (np.array([NORMAL]), {"normal_class": 3}, "out of range"),
        (np.array([NORMAL]), {"normal_class": "healthy"}, "not one of"),
        (np.array([NORMAL]), {"min_abnormal_fraction": 1.5}, r"\[0, 1\]"),
        (np.zeros((2, 2, 3)), {}, r"\[S, C\]"),
    ],
)
def test_validation_errors(probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        patient_verdict(probs, NAMES3, **kwargs)


def test_validation_errors_class_names():
    with pytest.raises(ValueError, match="at least 2"):
        patient_verdict(np.ones((2, 1)), ["only"])
    with pytest.raises(ValueError, match="distinct"):
        patient_verdict(np.full((2, 2), 0.5), ["a", "a"])


def test_group_by_patient():
    names = [
        "2_pat7_0001_0003.png",
        "0_pat1_0002_0010.png",
        "dir/2_pat7_0005_0004.png",
        "NCP_96_1328_0032.png",
    ]
    assert group_by_patient(names) == {"pat7": [0, 2], "pat1": [1], "96": [3]}
    recs = [{"patient_id": "a"}, {"patient": "b"}, {"patient_id": "a"}]
    assert group_by_patient(recs) == {"a": [0, 2], "b": [1]}
    assert group_by_patient(recs[:1] * 2, key="patient_id") == {"a": [0, 1]}
    assert group_by_patient([3, 4, 13], key=lambda x: x % 10) == {3: [0, 2], 4: [1]}
    with pytest.raises(ValueError, match="patient id"):
        group_by_patient(["scan.png"])
    with pytest.raises(ValueError, match="no patient id"):
        group_by_patient([{"name": "x"}])
