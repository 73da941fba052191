"""Per-device drift summaries: every device's telemetry feature summaries and prediction counts
merged per model version as the records arrive, in numeric columns SQL adds up without parsing
JSON (private to cloud.store; read by cloud/store/drift.py).

Why this shape. A fleet report merges every record's summary (64 features x (10 bins + 8
sums) = ~1,200 numbers a record on the digits model). Parsing each record's ~5.8 KB of JSON
in the database costs ~0.7 ms a record (minutes for 100,000 devices); merging numbers a device
has already merged is a plain ``GROUP BY`` with ``sum``/``min``/``max``. So the ingest, which
has the records parsed anyway, adds each batch's new records into one row set per (device,
model version):

- ``drift_summaries``: one row per (model version, ``field``, ``chunk``, device) with columns
  ``v0`` .. ``v63``: position ``j`` is feature ``chunk * 64 + j``. ``field`` is a summed array of
  the summary (``n``, ``missing``, ``sum``, ``sumsq``, ``rsum``, ``rsumsq``), ``min`` or ``max``
  (combined), ``h<b>`` (bin ``b`` of every feature's histogram: a row holds one bin of 64
  features, so ~20 rows a device instead of one per feature and bin), ``p`` (the prediction
  counts, position = class) or ``c`` (the confidence histogram, for rollout health). Keyed in
  the report's GROUP BY order (on SQLite a WITHOUT ROWID table: the fleet merge reads the rows
  in sequence). NULL: no record of the device had that position; SQL's aggregates
  skip it, exactly as the per-record merge skipped a shorter array (cloud/store/drift.py trims
  the positions no record has and counts a gap as 0).
- ``drift_devices``: per (device, model version) ``featured`` (records with a feature
  summary), ``residual`` (of those, with residual sums) and ``rn`` (their residual count):
  the report keeps residual sums only where every record has them.

Rows are fixed-width columns, not arrays: SQLite has none, and PostgreSQL's float8[] has no
element-wise ``sum``. Within a batch a device's records are merged in Python first, then one
upsert per row adds the batch into the stored row (``coalesce(a + b, a, b)``: NULL-safe). The
caller runs :func:`apply` in the transaction that inserted exactly these records (the ones not
stored before), so a duplicate re-delivered is never added twice and a crash mid-batch leaves
neither the records nor their summary. The price is at ingest: ~20 upserts of 64 values a
record (measured ~0.2 ms of worker CPU a record on SQLite, 0.34 -> 0.51 ms; more server time on
PostgreSQL, where each update writes a new row version). Label feedback only replaces label counts, which the
report still takes per record (cloud/store/drift.py), so nothing here changes after ingest.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from operator import itemgetter
from typing import Any, Iterable, Iterator

__all__ = ["SUMMED", "WIDTH", "apply", "backfill", "merge_records", "summary_rows"]

WIDTH = 64
SUMMED = ("n", "missing", "sum", "sumsq", "rsum", "rsumsq")
_COLS = tuple(f"v{j}" for j in range(WIDTH))
_PAD = (None,) * WIDTH
_KEY, _KEY2 = itemgetter(1, 2, 3, 0), itemgetter(0, 1)     # the tables' key order
Vector = list  # list[float | None]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


_NUMBERS = {int, float}


def _vector(values: Any) -> Vector | None:
    """A JSON array as numbers (an element that is none: None; not an array: None). The ingest's
    contract check guarantees numbers, so the common case is one C-level pass over the types;
    records stored before that check (the migration's backfill) are converted one by one."""
    if not isinstance(values, (list, tuple)):
        return None
    if set(map(type, values)) <= _NUMBERS:
        return values if isinstance(values, list) else list(values)
    return [_number(v) for v in values]


def _add(a: Vector, b: Vector) -> Vector:
    return [y if x is None else x if y is None else x + y for x, y in zip_longest(a, b)]


def _least(a: Vector, b: Vector) -> Vector:
    return [y if x is None else x if y is None else min(x, y) for x, y in zip_longest(a, b)]


def _greatest(a: Vector, b: Vector) -> Vector:
    return [y if x is None else x if y is None else max(x, y) for x, y in zip_longest(a, b)]


_COMBINE = {"min": _least, "max": _greatest}


def _record_fields(row: dict[str, Any]) -> tuple[dict[str, Vector], tuple[int, int, float]]:
    """One record's arrays by field, and its (featured, residual, rn)."""
    out: dict[str, Vector] = {}
    for field, column in (("p", "predictions"), ("c", "confidence_hist")):
        values = _vector(_loads(row.get(column)))
        if values is not None:
            out[field] = values
    features = _loads(row.get("features"))
    if not isinstance(features, dict):
        return out, (0, 0, 0.0)
    for key in (*SUMMED, "min", "max"):
        values = _vector(features.get(key))
        if values is not None:
            out[key] = values
    hist = features.get("hist")
    if isinstance(hist, list):
        rows = [h if isinstance(h, list) else [] for h in hist]
        for b, column in enumerate(zip_longest(*rows)):        # bin b of every feature
            out[f"h{b}"] = _vector(column)
    residual = features.get("rsum") is not None
    rn = _number(features.get("rn")) if residual else None
    return out, (1, int(residual), rn or 0.0)


def merge_records(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], tuple[dict[str, Vector], list[float]]]:
    """Per (device_id, model_version): the records' arrays merged by field, and [featured,
    residual, rn] added. Records without a model version are not summarised (the report skips them)."""
    out: dict[tuple[str, str], tuple[dict[str, Vector], list[float]]] = {}
    for row in rows:
        if row.get("model_version") is None:
            continue
        fields, counts = _record_fields(row)
        key = (row["device_id"], row["model_version"])
        if key not in out:
            out[key] = (fields, list(counts))
            continue
        merged, totals = out[key]
        for field, values in fields.items():
            old = merged.get(field)
            merged[field] = values if old is None else _COMBINE.get(field, _add)(old, values)
        for i, c in enumerate(counts):
            totals[i] += c
    return out


def summary_rows(merged: dict[tuple[str, str], tuple[dict[str, Vector], list[float]]]
                 ) -> tuple[dict[str, list[tuple[Any, ...]]], list[tuple[Any, ...]]]:
    """The ``drift_summaries`` rows by kind ("sum", "min", "max") and the ``drift_devices`` rows."""
    by_kind: dict[str, list[tuple[Any, ...]]] = {"sum": [], "min": [], "max": []}
    devices = []
    for (device_id, mv), (fields, (featured, residual, rn)) in merged.items():
        devices.append((device_id, mv, int(featured), int(residual), rn))
        for field, values in fields.items():
            out = by_kind[field if field in ("min", "max") else "sum"]
            if len(values) == WIDTH:          # the common case (64 features), without slicing
                out.append((device_id, mv, field, 0, *values))
                continue
            for chunk in range(0, max(len(values), 1), WIDTH):
                part = values[chunk:chunk + WIDTH]
                out.append((device_id, mv, field, chunk // WIDTH, *part, *_PAD[len(part):]))
    return by_kind, devices


def _upsert(kind: str) -> str:
    old, new = "drift_summaries.{c}", "excluded.{c}"
    if kind == "sum":
        expr = f"coalesce({old} + {new}, {old}, {new})"
    else:
        op = "<" if kind == "min" else ">"
        expr = f"case when {new} {op} {old} then {new} else coalesce({old}, {new}) end"
    sets = ", ".join(f"{c} = " + expr.format(c=c) for c in _COLS)
    return (f"insert into drift_summaries (device_id, model_version, field, chunk, {', '.join(_COLS)}) "
            f"values ({', '.join('?' * (4 + WIDTH))}) "
            f"on conflict (model_version, field, chunk, device_id) do update set {sets}")


_UPSERTS = {kind: _upsert(kind) for kind in ("sum", "min", "max")}
_DEVICES = ("insert into drift_devices (device_id, model_version, featured, residual, rn) values (?, ?, ?, ?, ?) "
            "on conflict (device_id, model_version) do update set featured = drift_devices.featured + "
            "excluded.featured, residual = drift_devices.residual + excluded.residual, "
            "rn = drift_devices.rn + excluded.rn")


def apply(conn: Any, rows: Iterable[dict[str, Any]]) -> None:
    """Add ``rows`` (telemetry records just inserted, features and predictions parsed) into
    their devices' summaries, on ``conn`` inside the caller's transaction."""
    by_kind, devices = summary_rows(merge_records(rows))
    # in key order: two ingest workers adding batches of the same devices (a shared subscription
    # splits a device's records between them) lock the rows in one order, so neither deadlocks
    if devices:
        conn.executemany(_DEVICES, sorted(devices, key=_KEY2))
    for kind, values in by_kind.items():
        if values:
            conn.executemany(_UPSERTS[kind], sorted(values, key=_KEY))


def backfill(conn: Any, page: int = 2000) -> None:
    """Summarise every stored record (a migration step: a database written before the summaries
    existed). Pages in (device_id, seq) order, parsing each record's JSON once."""
    last: tuple[str, int] | None = None
    while True:
        where, args = ("where model_version is not null", []) if last is None else \
            ("where model_version is not null and (device_id > ? or (device_id = ? and seq > ?))",
             [last[0], last[0], last[1]])
        got = conn.execute(f"select device_id, seq, model_version, predictions, confidence_hist, features "
                           f"from telemetry {where} "
                           f"order by device_id, seq limit {int(page)}", args).fetchall()
        if not got:
            return
        apply(conn, _parsed(got))
        last = (got[-1][0], int(got[-1][1]))


def _parsed(rows: list[tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    for device_id, _seq, mv, predictions, confidence, features in rows:
        yield {"device_id": device_id, "model_version": mv, "predictions": predictions,
               "confidence_hist": confidence, "features": features}


def _loads(text: Any) -> Any:
    """JSON text parsed (a stored record's; None if it does not parse), anything else as it is."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None
