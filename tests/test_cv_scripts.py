"""The cross-validation scripts' fold logic (scripts/semiseg_cv.py, scripts/ctmd_block_cv.py,
scripts/cv_folds.py): no slice in two folds, contiguous blocks, the gap around a test block,
resumable folds and the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import ctmd_block_cv
        import cv_folds
        import semiseg_cv
        yield semiseg_cv, ctmd_block_cv, cv_folds
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("n, k", [(50, 5), (23, 5), (5, 5), (7, 3)])
def test_semiseg_folds_are_contiguous_disjoint_and_cover_every_slice(scripts, n, k):
    semiseg_cv, _, _ = scripts
    names = [f"{i}.jpg" for i in range(n)]
    folds = semiseg_cv.fold_lists(names, k)
    assert len(folds) == k
    assert [name for fold in folds for name in fold] == names            # in order, each once
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_block_folds_leave_a_gap_and_never_train_on_a_test_slice(scripts):
    _, ctmd, _ = scripts
    patients = ["A"] * 12 + ["B"] * 9
    folds = ctmd.block_folds(patients, blocks=3, gap=2)
    tested = [i for _, test in folds for i in test]
    assert sorted(tested) == list(range(21))                             # every slice tested once
    for train, test in folds:
        assert not set(train) & set(test)
        for pid in "AB":
            members = [i for i, p in enumerate(patients) if p == pid]
            block = [i for i in test if patients[i] == pid]
            assert block == list(range(block[0], block[-1] + 1))         # contiguous per patient
            near = {i for i in members if block[0] - 2 <= i < block[0] or block[-1] < i <= block[-1] + 2}
            assert not near & set(train)                                  # the gap is left out
            assert set(members) - set(block) - near == {i for i in train if patients[i] == pid}
    assert folds[1][1][:4] == [4, 5, 6, 7] and 0 in folds[1][0] and 2 not in folds[1][0]


def test_run_folds_resumes_finished_folds_and_summarises(scripts, tmp_path):
    _, _, cv_folds = scripts
    calls = []

    def fold(k, fold_dir):
        calls.append(k)
        return {"Dice": [0.2, 0.4, 0.9][k], "note": ["a"]}

    first = cv_folds.run_folds(tmp_path, 3, [0, 2], fold)
    assert calls == [0, 2] and [r["fold"] for r in first] == [0, 2]
    again = cv_folds.run_folds(tmp_path, 3, None, fold)
    assert calls == [0, 2, 1]                                             # only the missing fold runs
    summary = cv_folds.mean_sd(again, ["Dice", "absent"])
    assert summary["Dice"]["mean"] == pytest.approx(0.5)
    assert summary["Dice"]["std"] == pytest.approx(0.36055512754639896)
    assert "absent" not in summary


def test_semiseg_rows_get_numbers_added_later_from_the_folds_metrics(scripts, tmp_path):
    semiseg_cv, _, _ = scripts
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(
        {"pixel": {"lesion": {"dice": 0.5}, "GGO": {"dice": 0.4}}}))
    row = semiseg_cv.with_all_numbers({"fold": 0, "Dice": 0.5}, tmp_path)
    assert row["GGO Dice"] == 0.4 and row["C Dice"] is None and row["Dice"] == 0.5
