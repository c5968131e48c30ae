"""A report's tables: results.csv (every column of the row with a header) and results.md (the md columns that hold a
value, under a note naming the feature space and the judges, and each series at its best scale)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from guidelab.files import atomic_text
from guidelab.report.rows import best_rows
from guidelab.results import COLUMNS, HEADER, ROW, TABLE

DISAGREE = 0.03  # rows whose two evaluators' accuracies differ by more are flagged in results.md


def fmt(v) -> str:
    """A cell: empty for None, 4 significant digits for a float."""
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def csv_rows(rows: list[dict]) -> list[list[str]]:
    """results.csv's cells (the header not included): one list per row, in TABLE's order."""
    return [[fmt(r[c]) for c in TABLE] for r in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    """results.csv, written atomically (a report run again over a sweep never leaves half a table)."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows([HEADER] + csv_rows(rows))
    atomic_text(path, text.getvalue())


def _features_note(rows: list[dict]) -> str:
    """What FID / IS / precision / recall were measured in, or that they were not."""
    features = sorted({r["features"] for r in rows if r["features"]})
    if features:
        own = " (the codebase's own evaluators: not comparable with literature FIDs)" if "evaluator" in features else ""
        return f"FID / IS / precision / recall in **{', '.join(features)}** features" + own
    if any(r["accuracy"] is not None for r in rows):
        return "accuracy only; FID / IS / precision / recall need eval=true"
    return "no evaluation (run with eval=true evaluator_ckpt=PATH)"


def _judges_note(rows: list[dict]) -> str:
    """Who judged: each evaluator and the k-NN judge with its held-out accuracy, the guidance classifier's own."""
    note = ""
    for suffix, which in (("", "primary evaluator"), ("_2", "second evaluator (`_2` columns)")):
        name, acc = f"evaluator{suffix}", f"evaluator{suffix}_test_acc"
        judges = sorted({(r[name], r[acc]) for r in rows if r[name] is not None}, key=str)
        if judges:
            note += f"; {which}: " + ", ".join(f"{n} (held-out accuracy on real data {fmt(a)})" for n, a in judges)
    if knn := sorted({r["knn_test_acc"] for r in rows if r["knn_test_acc"] is not None}):
        note += f"; k-NN judge in pixel space (held-out accuracy on real data {', '.join(map(fmt, knn))})"
    guides = {json.dumps(r["classifier_test_acc"]) for r in rows if r.get("classifier_test_acc")}
    for accs in map(json.loads, sorted(guides)):  # the guidance classifier's own held-out accuracy
        note += "; guidance classifier held-out accuracy " + ", ".join(
            f"{a:.2f}" + ("" if t == "clean" else f" at t = {t[1:]}") for t, a in accs.items()
        )
    return note


def _classes_note(rows: list[dict]) -> str:
    """What the class indices (grids, accuracy_per_class) stand for, where the checkpoint named them."""
    note = ""
    for listed in map(json.loads, sorted({json.dumps(r["class_names"]) for r in rows if r.get("class_names")})):
        if listed != [str(i) for i in range(len(listed))]:  # digits: the names are the indices
            note += "; classes " + ", ".join(f"{i} {name}" for i, name in enumerate(listed))
    return note


def flagged(rows: list[dict]) -> list[dict]:
    """The rows whose two evaluators' accuracies differ by more than DISAGREE."""
    return [r for r in rows if r["disagreement"] is not None and abs(r["disagreement"]) > DISAGREE + 1e-9]


def _table(rows: list[dict], cols: list[str], marked: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS[c].header or c for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = (fmt(r[c]) + (" **!**" if c == "disagreement" and r in marked else "") for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict]) -> str:
    """results.md: the note, the table of the md columns that hold a value, and each series at its best scale."""
    cols = [c.name for c in ROW if c.md and any(r[c.name] is not None for r in rows)]
    marked = flagged(rows)
    note = _features_note(rows) + _judges_note(rows) + _classes_note(rows)
    if any(r["disagreement"] is not None for r in rows):
        note += (
            f"; **!** marks the {len(marked)} rows whose evaluators differ by more than {DISAGREE:.0%} in accuracy"
            if marked
            else f"; the two evaluators agree within {DISAGREE:.0%} on every row"
        )
    lines = [note, ""] + _table(rows, cols, marked)
    if (best := best_rows(rows)) and len(best) < len(rows):
        lines += [
            "",
            "Each series at its best scale (the highest primary-evaluator accuracy; ties: the lower FID):",
            "",
        ]
        lines += _table(best, cols, marked)
    return "\n".join(lines)
