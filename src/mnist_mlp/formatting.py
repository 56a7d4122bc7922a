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


def confusion_lines(matrix: Sequence[Sequence[int]]) -> list[str]:
    """The confusion matrix with a header row of predictions and row totals."""
    width = max(5, len(f"{max(max(row) for row in matrix):,}") + 1)
    classes = range(len(matrix))
    lines = [
        "confusion matrix (rows: true class, columns: predicted class)",
        "true" + "".join(f"{p:>{width}}" for p in classes) + f"{'total':>{width + 2}}",
    ]
    for t in classes:
        cells = "".join(f"{matrix[t][p]:>{width},}" for p in classes)
        lines.append(f"{t:>4}{cells}{sum(matrix[t]):>{width + 2},}")
    return lines


def comparison_lines(reports: Sequence) -> list[str]:
    """Several reports on the same data side by side: one column per checkpoint."""
    # Columns are headed A, B, ...: the paths are listed above the table.
    width = 11

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
    lines += ["", "F1 by class"]
    for c in range(len(reports[0].score.per_class)):
        cells = [_number(r.score.per_class[c].f1, 0) for r in reports]
        lines.append(row(f"{c:>5}", cells))
    # Where the models disagree most is what a comparison is for.
    if len(reports) == 2:
        a, b = (r.score.per_class for r in reports)
        gaps = [
            (abs(x.f1 - y.f1), x.label)
            for x, y in zip(a, b, strict=True)
            if x.f1 is not None and y.f1 is not None
        ]
        if gaps:
            gap, label = max(gaps)
            lines += ["", f"largest F1 difference: class {label} ({gap:.4f})"]
    return lines
