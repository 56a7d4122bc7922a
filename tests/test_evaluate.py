"""Scores from predictions: confusion matrix, precision/recall/F1, mistakes, tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnist_mlp import files
from mnist_mlp.evaluate import (
    EvalReport,
    Score,
    most_confident_mistakes,
    score_probabilities,
)
from mnist_mlp.formatting import comparison_lines, confusion_lines, evaluation_lines


def _probabilities(labels: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Random softmax-like rows whose argmax equals `labels` for about `accuracy` of them."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    p = rng.random((n, 10)).astype("float32")
    guess = np.where(rng.random(n) < accuracy, labels, rng.integers(0, 10, n))
    p[np.arange(n), guess] += 2.0
    return p / p.sum(axis=1, keepdims=True)


def test_confusion_matrix_and_per_class_scores_match_a_direct_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    probabilities = _probabilities(labels, 0.7, seed=1)
    score = score_probabilities(probabilities, labels)
    predicted = probabilities.argmax(axis=1)

    matrix = np.asarray(score.confusion)
    assert matrix.sum() == score.total == 500
    assert np.trace(matrix) == score.correct == int((predicted == labels).sum())
    assert score.accuracy == pytest.approx(float((predicted == labels).mean()))
    for c, cls in enumerate(score.per_class):
        tp = int(((predicted == c) & (labels == c)).sum())
        assert matrix[c].sum() == cls.total == int((labels == c).sum())
        assert matrix[:, c].sum() == cls.predicted == int((predicted == c).sum())
        assert cls.precision == pytest.approx(tp / (predicted == c).sum())
        assert cls.recall == pytest.approx(tp / (labels == c).sum())
        p, r = cls.precision, cls.recall
        assert cls.f1 == pytest.approx(2 * p * r / (p + r))
    # Loss: mean categorical cross-entropy of the true class.
    expected_loss = -np.log(probabilities[np.arange(500), labels].astype("float64")).mean()
    assert score.loss == pytest.approx(expected_loss, rel=1e-5)


def test_undefined_scores_are_none_not_zero_and_survive_json():
    # Class 1 has no images and class 2 is never predicted.
    score = Score(loss=0.1, confusion=((3, 0, 0), (0, 0, 0), (1, 0, 0)))
    zero, one, two = score.per_class
    assert one.accuracy is None and one.recall is None and one.precision is None
    assert two.precision is None and two.f1 is None and two.recall == 0.0
    assert zero.precision == 0.75 and zero.recall == 1.0
    macro = score.macro_average()
    assert macro["precision"] == 0.75  # only class 0 has a precision
    assert macro["recall"] == 0.5  # classes 0 and 2; class 1 has no images
    document = json.loads(files.to_json(score.as_dict()))
    assert document["per_class"][1]["accuracy"] is None
    assert document["confusion_matrix"] == [[3, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_f1_is_zero_when_a_class_is_predicted_but_never_right():
    score = Score(loss=0.0, confusion=((0, 2), (1, 0)))
    assert score.per_class[0].precision == 0.0 and score.per_class[0].f1 == 0.0


def test_mistakes_are_the_most_confident_wrong_ones_in_order():
    labels = np.array([0, 1, 2, 3, 4, 5])
    p = np.full((6, 10), 0.01, dtype="float32")
    p[0, 0] = 0.99  # right
    p[1, 7] = 0.80  # wrong, 0.80
    p[2, 9] = 0.95  # wrong, 0.95
    p[3, 3] = 0.60  # right
    p[4, 1] = 0.80  # wrong, ties with index 1
    p[5, 6] = 0.50  # wrong, least confident
    mistakes = most_confident_mistakes(p, labels, count=3)
    assert [(m.index, m.label, m.predicted) for m in mistakes] == [(2, 2, 9), (1, 1, 7), (4, 4, 1)]
    assert mistakes[0].probability == pytest.approx(0.95)
    assert most_confident_mistakes(p[[0, 3]], labels[[0, 3]]) == ()


def test_evaluation_table_is_aligned_and_reads_back():
    labels = np.random.default_rng(2).integers(0, 10, 3000)
    score = score_probabilities(_probabilities(labels, 0.9, seed=3), labels)
    report = EvalReport("runs/a/model.keras", "test data", score)
    lines = evaluation_lines(report)
    table = lines[lines.index(next(x for x in lines if x.startswith("class"))) :]
    rows = table[: table.index("")]
    assert len({len(row) for row in rows}) == 1, rows  # every row as wide as the header
    for row, cls in zip(rows[1:11], score.per_class, strict=True):
        label, precision, recall, f1, support = row.split()
        assert int(label) == cls.label and int(support.replace(",", "")) == cls.total
        assert float(precision) == pytest.approx(cls.precision, abs=5e-5)
        assert float(recall) == pytest.approx(cls.recall, abs=5e-5)
        assert float(f1) == pytest.approx(cls.f1, abs=5e-5)
    matrix_lines = confusion_lines(score.confusion)
    read = [[int(v.replace(",", "")) for v in line.split()[1:]] for line in matrix_lines[2:]]
    assert [row[:10] for row in read] == [list(r) for r in score.confusion]
    assert len({len(line) for line in matrix_lines[1:]}) == 1


def _reports(accuracies, n=1000, seed=4):
    labels = np.random.default_rng(seed).integers(0, 10, n)
    return [
        EvalReport(
            f"runs/{i}/model.keras",
            "test data",
            score_probabilities(_probabilities(labels, acc, seed=seed + i), labels),
        )
        for i, acc in enumerate(accuracies)
    ]


def test_comparison_puts_each_checkpoint_in_its_own_column():
    reports = _reports([0.95, 0.5])
    lines = comparison_lines(reports)
    accuracy = next(line for line in lines if line.startswith("accuracy")).split()[1:]
    assert [float(a) for a in accuracy] == pytest.approx(
        [r.score.accuracy for r in reports], abs=5e-5
    )
    assert "A               runs/0/model.keras" in lines
    header = lines.index(next(x for x in lines if x.startswith("class  precision A")))
    assert lines[header].split()[1:] == [
        "precision", "A", "precision", "B", "recall", "A", "recall", "B", "F1", "A", "F1", "B"
    ]
    for c, line in enumerate(lines[header + 1 : header + 11]):
        cells = [float(v) for v in line.split()[1:]]
        a, b = (r.score.per_class[c] for r in reports)
        expected = [a.precision, b.precision, a.recall, b.recall, a.f1, b.f1]
        assert cells == pytest.approx(expected, abs=5e-5)
    gaps = [abs(a.f1 - b.f1) for a, b in zip(*(r.score.per_class for r in reports), strict=True)]
    assert f"largest F1 difference: class {int(np.argmax(gaps))} ({max(gaps):.4f})" in lines
    # B - A, cell by cell: the matrix a user reads to see which confusions changed.
    start = lines.index(next(x for x in lines if x.startswith("confusion matrix B - A")))
    diff = [[int(v) for v in line.split()[1:]] for line in lines[start + 2 : start + 12]]
    a, b = (np.array(r.score.confusion) for r in reports)
    assert (np.array(diff) == b - a).all()


def test_comparing_a_model_with_itself_names_no_class():
    (report,) = _reports([0.8])
    lines = comparison_lines([report, report])
    assert "F1 is the same in every class" in lines
    assert not any(line.startswith("largest F1 difference") for line in lines)


def test_comparison_columns_stay_aligned_on_a_full_test_set():
    lines = comparison_lines(_reports([0.99, 0.9], n=10_000))
    table = lines[lines.index("") + 1 :]
    table = table[: table.index("")]
    # `9,899/10,000` is the widest cell: every row still ends in the same column.
    assert len({len(row) for row in table}) == 1, table
