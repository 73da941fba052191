"""``edgeloop labels add FILE``: operator label feedback (delayed ground truth) for telemetry windows.

FILE is CSV with a header: ``device_id,seq,labelled,correct`` and, for a regression model, an
optional ``mae``: for the window a device sent with sequence number ``seq``, how many of its
inferences the operator has since labelled, how many of those the model got right (for
regression: within the task's tolerance, ``models show`` prints it) and their mean absolute
error. It replaces the device's own label counts (and error sum) for that window in live
accuracy and MAE (``edgeloop drift report`` per cohort). Bad rows are refused as a whole, with
the line number; nothing is stored then.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any, Callable

from edgeloop.cloud.errors import UserError
from edgeloop.fleet._output import Output

__all__ = ["add_labels_commands", "read_label_csv"]

COLUMNS = ("device_id", "seq", "labelled", "correct")


def add_labels_commands(sub: Any, group: Callable, action: Callable) -> None:
    labels = group(sub, "labels", "operator label feedback for telemetry windows", _usage)
    p = action(labels, "add", "add delayed ground truth from a CSV file (device_id,seq,labelled,correct[,mae])", _add)
    p.add_argument("file", type=Path, metavar="FILE")


def read_label_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a label feedback file. Raises UserError naming the first bad line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not set(COLUMNS) <= {c.strip() for c in reader.fieldnames}:
        raise UserError(f"{path}: the header must name {','.join(COLUMNS)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        try:
            seq, labelled, correct = int(row["seq"]), int(row["labelled"]), int(row["correct"])
        except ValueError:
            raise UserError(f"{path}:{line}: seq, labelled and correct must be whole numbers") from None
        if not row["device_id"] or seq < 0 or not 0 <= correct <= labelled:
            raise UserError(f"{path}:{line}: needs a device id, seq >= 0 and 0 <= correct <= labelled")
        mae = None
        if row.get("mae"):
            try:
                mae = float(row["mae"])
            except ValueError:
                mae = -1.0
            if not (mae >= 0 and mae != float("inf")):
                raise UserError(f"{path}:{line}: mae must be a non-negative number (the mean absolute error)")
        rows.append({"device_id": row["device_id"], "seq": seq, "labelled": labelled, "correct": correct,
                     "abs_err_sum": None if mae is None else mae * labelled})
    if not rows:
        raise UserError(f"{path}: no label rows")
    return rows


def _usage(args: argparse.Namespace, out: Output) -> int:
    raise UserError("say what to do: edgeloop labels add FILE")


def _add(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.workspace import Workspace

    rows = read_label_csv(args.file)
    registry = Registry(Workspace.open(args.workspace).store_location)
    try:
        known = registry.add_label_feedback(rows)
    finally:
        registry.close()
    out.result({"rows": len(rows), "windows_known": known, "windows_unknown": len(rows) - known},
               f"{len(rows)} label rows added ({known} name stored telemetry windows, "
               f"{len(rows) - known} not yet received)")
    return 0
