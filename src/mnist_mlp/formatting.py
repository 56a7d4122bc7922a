"""Plain-text tables for the terminal: evaluation reports and their comparison.

Pure functions from report objects to lines, so the CLI only prints them and
tests can check the layout without running a model.
"""

from __future__ import annotations

from collections.abc import Sequence


def _number(value: float | None, width: int = 9) -> str:
    """A ratio to 4 places, or '-' where it is undefined (a class never predicted)."""
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


def evaluation_lines(report) -> list[str]:
    """Loss, accuracy, per-class precision/recall/F1 and the confusion matrix."""
    s = report.score
    lines = [
        f"checkpoint  {report.checkpoint}",
        f"data        {report.data}",
        f"loss        {s.loss:.4f}",
        f"accuracy    {s.accuracy:.4f}  ({s.correct:,}/{s.total:,})",
        "",
        "class  precision     recall         f1  support",
    ]
    for c in s.per_class:
        lines.append(
            f"{c.label:>5}  {_number(c.precision)}  {_number(c.recall)}  {_number(c.f1)}"
            f"  {c.total:>7,}"
        )
    macro = s.macro_average()
    lines.append(
        f"{'macro':>5}  {_number(macro['precision'])}  {_number(macro['recall'])}"
        f"  {_number(macro['f1'])}  {s.total:>7,}"
    )
    lines += ["", *confusion_lines(s.confusion)]
    return lines


def confusion_lines(
    matrix: Sequence[Sequence[int]],
    title: str = "confusion matrix (rows: true class, columns: predicted class)",
    signed: bool = False,
) -> list[str]:
    """The confusion matrix with a header row of predictions.

    Args:
        matrix: counts, rows the true classes.
        title: the first line.
        signed: a difference of two matrices: `+3`/`-2` per cell and no row totals
            (the rows of two reports on the same data sum to the same counts).
    """
    classes = range(len(matrix))

    def cell(value: int) -> str:
        return (f"{value:+,}" if value else "0") if signed else f"{value:,}"

    width = max(5, *(len(cell(v)) + 1 for row in matrix for v in row))
    total = "" if signed else f"{'total':>{width + 2}}"
    lines = [title, "true" + "".join(f"{p:>{width}}" for p in classes) + total]
    for t in classes:
        cells = "".join(f"{cell(matrix[t][p]):>{width}}" for p in classes)
        total = "" if signed else f"{sum(matrix[t]):>{width + 2},}"
        lines.append(f"{t:>4}{cells}{total}")
    return lines


def comparison_lines(reports: Sequence) -> list[str]:
    """Several reports on the same data side by side: one column per checkpoint."""
    # Columns are headed A, B, ...: the paths are listed above the table. Wide
    # enough for the longest cell, `9,899/10,000` on a full test set.
    width = max(11, *(len(f"{r.score.correct:,}/{r.score.total:,}") for r in reports))

    def row(label: str, cells: Sequence[str]) -> str:
        return f"{label:<16}" + "".join(f"  {cell:>{width}}" for cell in cells)

    lines = [f"{'data':<16}{reports[0].data}"]
    lines += [f"{chr(ord('A') + i):<16}{r.checkpoint}" for i, r in enumerate(reports)]
    lines += [
        "",
        row("", [chr(ord("A") + i) for i in range(len(reports))]),
        row("loss", [f"{r.score.loss:.4f}" for r in reports]),
        row("accuracy", [f"{r.score.accuracy:.4f}" for r in reports]),
        row("correct", [f"{r.score.correct:,}/{r.score.total:,}" for r in reports]),
    ]
    for metric in ("precision", "recall", "f1"):
        lines.append(
            row(f"macro {metric}", [_number(r.score.macro_average()[metric], 0) for r in reports])
        )
    letters = [chr(ord("A") + i) for i in range(len(reports))]
    columns = [(metric, letter) for metric in ("precision", "recall", "f1") for letter in letters]
    names = {"precision": "precision", "recall": "recall", "f1": "F1"}
    lines += ["", "class" + "".join(f"  {f'{names[m]} {x}':>11}" for m, x in columns)]
    for c in range(len(reports[0].score.per_class)):
        cells = [
            _number(getattr(reports[letters.index(x)].score.per_class[c], m), 11)
            for m, x in columns
        ]
        lines.append(f"{c:>5}" + "".join(f"  {cell}" for cell in cells))
    # Where the models disagree most is what a comparison is for.
    if len(reports) == 2:
        a, b = (r.score for r in reports)
        gaps = [
            (abs(x.f1 - y.f1), x.label)
            for x, y in zip(a.per_class, b.per_class, strict=True)
            if x.f1 is not None and y.f1 is not None
        ]
        # max keeps the first of equal gaps: the lowest class, not the highest.
        gap, label = max(gaps, key=lambda g: g[0]) if gaps else (0.0, None)
        lines.append("")
        if gap > 0:
            lines.append(f"largest F1 difference: class {label} ({gap:.4f})")
        else:
            lines.append("F1 is the same in every class")
        difference = [
            [b.confusion[t][p] - a.confusion[t][p] for p in range(len(a.confusion))]
            for t in range(len(a.confusion))
        ]
        lines += [
            "",
            *confusion_lines(
                difference,
                "confusion matrix B - A (rows: true class, columns: predicted class)",
                signed=True,
            ),
        ]
    return lines
