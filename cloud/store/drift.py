"""Store operations for the drift report: the per-cohort merge of the devices' mergeable telemetry
summaries, computed by the database (private to cloud.store; see cloud.store.interface).

A telemetry record carries its window's feature summary (``features``: per-feature histogram
bins ``hist``, and ``n``, ``missing``, ``sum``, ``sumsq``, ``min``, ``max``, the residual sums
``rn``, ``rsum``, ``rsumsq``) and prediction counts. Counts and sums add and minima and maxima
combine, so a cohort's summary is a handful of ``GROUP BY`` aggregates. Not over the records:
the ingest merges each device's records per model version into numeric rows as it stores them
(cloud/store/drift_summary.py), so the feature summaries and prediction counts are sums, minima
and maxima over one row set per device, and no record's JSON is parsed (nor crosses into
Python), whatever the fleet's size. The label counts, which operator feedback may replace at
any time, are still summed per record, from plain numeric columns. The same merge as
``cloud.drift.monitor.merge`` (residual sums only where every record of the cohort has them).

Cohorts (``by``): ``device``, ``tier``, ``tag`` (a device with two tags is in two cohorts; one
with none in ``(untagged)``), ``site`` (the ``site`` tag, ``?`` without), ``model_version``,
``fleet``; always per model version. Operator label feedback replaces a window's label counts
as in :meth:`FleetOps.drift_rows`.
"""

from __future__ import annotations

from typing import Any

from edgeloop.cloud.store._base import SqliteBase
from edgeloop.cloud.store.drift_summary import WIDTH

__all__ = ["DriftOps", "SQL_COHORTS"]

SQL_COHORTS = ("device", "tier", "tag", "site", "model_version", "fleet")
_FIELDS = ("n", "missing", "sum", "sumsq", "rsum", "rsumsq", "min", "max")

# a feedback row replaces the window's label counts; its error sum only where it gave one
_ERR = ("(case when l.seq is null then t.abs_err_sum when l.abs_err_sum is not null then l.abs_err_sum "
        "when t.abs_err_sum is not null and t.labelled > 0 then t.abs_err_sum * l.labelled / t.labelled "
        "else null end)")
_LABELLED = "coalesce(l.labelled, t.labelled)"
_CORRECT = "coalesce(l.correct, t.correct)"


class DriftOps(SqliteBase):
    def _cohort(self, by: str) -> tuple[str, str]:
        """(the cohort key's SQL expression, the join it needs) for ``by``."""
        pg = self.dialect.name == "postgresql"
        if by == "tag":
            join = ("left join lateral jsonb_each_text(d.tags::jsonb) g(key, value) on true" if pg
                    else "left join json_each(d.tags) g")
            return "(case when g.key is null then '(untagged)' else g.key || '=' || g.value end)", join
        if by == "site":
            site = "(d.tags::jsonb->>'site')" if pg else "json_extract(d.tags, '$.site')"
            return f"coalesce({site}, '?')", ""
        if by not in SQL_COHORTS:
            raise ValueError(f"unknown cohort {by!r}")
        return {"device": "t.device_id", "tier": "coalesce(d.tier, '?')", "model_version": "t.model_version",
                "fleet": "'fleet'"}[by], ""

    def _from(self, join: str) -> str:
        return ("from telemetry t left join devices d on d.device_id = t.device_id "
                f"left join label_feedback l on l.device_id = t.device_id and l.seq = t.seq {join} ")

    def drift_cohort_totals(self, by: str) -> list[dict[str, Any]]:
        """Per (cohort ``key``, ``model_version``) over every record with a model version:
        ``records``, ``inferences``, ``labelled``, ``correct``, ``err_records`` (records with an
        absolute error sum), ``abs_err_sum`` and ``err_labelled`` (their labelled inferences),
        ``featured`` and ``residual`` (records with a feature summary, with residual sums),
        ``rn`` (their residual count) and ``predictions`` (the prediction counts added up); by
        key and model version.

        The label counts are summed per record (numeric columns: operator feedback replaces a
        window's counts at any time); the rest from the per-device summaries."""
        key, join = self._cohort(by)
        totals = self._rows(
            f"select {key} as key, t.model_version as model_version, count(*) as records, "
            f"coalesce(sum(t.count), 0) as inferences, coalesce(sum({_LABELLED}), 0) as labelled, "
            f"coalesce(sum({_CORRECT}), 0) as correct, count({_ERR}) as err_records, sum({_ERR}) as abs_err_sum, "
            f"coalesce(sum(case when {_ERR} is not null then {_LABELLED} else 0 end), 0) as err_labelled "
            + self._from(join) + "where t.model_version is not null group by 1, 2 order by 1, 2")
        summed = {(r[0], r[1]): r[2:] for r in self._tuples(
            f"select {key}, t.model_version, sum(t.featured), sum(t.residual), sum(t.rn) "
            + _summary_from("drift_devices", join) + " group by 1, 2")}
        preds = self._fields(key, join, "sum", "t.field = 'p'")
        for row in totals:
            featured, residual, rn = summed.get((row["key"], row["model_version"]), (0, 0, 0))
            row.update(featured=int(featured or 0), residual=int(residual or 0), rn=_whole(rn or 0))
            counts = preds.get((row["key"], row["model_version"]), {}).get("p")
            row["predictions"] = [_whole(x) for x in _trim(counts)] if counts else None
        return totals

    def drift_cohort_features(self, by: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Per (cohort key, model version) the merged feature summary of its records that have
        one: ``hist`` (per feature, the bins added), ``n``, ``missing``, ``sum``, ``sumsq`` (added),
        ``min``, ``max`` (combined) and ``rsum``, ``rsumsq`` (added; the caller keeps them only
        where every record has them, see :meth:`drift_cohort_totals`). Lists, not arrays.

        A ``GROUP BY`` over the per-device summaries (cloud/store/drift_summary.py): one row per
        device and field, 64 features a row, whatever the number of records."""
        key, join = self._cohort(by)
        parts = self._fields(key, join, "sum", "t.field not in ('min', 'max', 'p', 'c')")
        for agg in ("min", "max"):
            for cohort, fields in self._fields(key, join, agg, f"t.field = '{agg}'").items():
                parts.setdefault(cohort, {}).update(fields)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for cohort, fields in parts.items():
            summary: dict[str, Any] = {f: _trim(fields[f]) for f in _FIELDS if f in fields}
            if not summary:
                continue
            bins = [fields[f] for f in sorted((f for f in fields if f.startswith("h")), key=lambda f: int(f[1:]))]
            out[cohort] = {**summary, "hist": _features_bins(bins)}
        return out

    def _fields(self, key: str, join: str, agg: str, where: str) -> dict[tuple[str, str], dict[str, list[Any]]]:
        """Per (cohort key, model version) and summary field, ``agg`` of each position over the
        cohort's devices (None: no device has it), the chunks of 64 joined in order."""
        cols = ", ".join(f"{agg}(t.v{j})" for j in range(WIDTH))
        out: dict[tuple[str, str], dict[str, list[Any]]] = {}
        for r in sorted(self._tuples(f"select {key}, t.model_version, t.field, t.chunk, {cols} "
                                     + _summary_from("drift_summaries", join) + f" and {where} "
                                     + _GROUP.get(key, "group by 1, 2, 3, 4")),
                        key=lambda r: r[3]):
            values = out.setdefault((r[0], r[1]), {}).setdefault(r[2], [])
            values.extend([None] * (int(r[3]) * WIDTH - len(values)))
            values.extend(r[4:])
        return out

    def drift_cohort_rows(self, by: str, newest: int) -> list[dict[str, Any]]:
        """Per (cohort key, model version): its first record (``first``; its ``tier`` picks the
        baseline) and its newest ``newest`` records short of all of them (``recent``; only these
        carry ``predictions`` and ``features``), as :meth:`FleetOps.drift_rows` gives them plus
        ``key``; in (key, model version, window_end, device_id, seq) order."""
        key, join = self._cohort(by)
        order = "t.window_end, t.device_id, t.seq"
        part = f"partition by {key}, t.model_version"
        recent = "(r.rank_last <= ? and r.rank_last < r.records)"
        rows = self._rows(
            "select r.key, r.device_id, r.seq, r.model_version, r.window_end, r.count, r.abs_err_sum, r.labelled, "
            f"r.correct, r.tier, r.tags, r.rank_first, case when {recent} then 1 else 0 end as recent, "
            f"case when {recent} then f.predictions end as predictions, "
            f"case when {recent} then f.features end as features from (select "
            f"{key} as key, t.device_id, t.seq, t.model_version, t.window_end, t.count, "
            f"{_ERR} as abs_err_sum, {_LABELLED} as labelled, {_CORRECT} as correct, "
            "coalesce(d.tier, '?') as tier, d.tags as tags, "
            f"row_number() over ({part} order by {order}) as rank_first, "
            f"row_number() over ({part} order by t.window_end desc, t.device_id desc, t.seq desc) as rank_last, "
            f"count(*) over ({part}) as records "
            + self._from(join) + "where t.model_version is not null) r "
            # the JSON read back only for the rows kept (not carried through the window's sort)
            "join telemetry f on f.device_id = r.device_id and f.seq = r.seq "
            f"where r.rank_first = 1 or {recent} order by r.key, r.model_version, r.window_end, r.device_id, r.seq",
            [int(newest)] * 4)
        for r in rows:
            r["first"], r["recent"] = r.pop("rank_first") == 1, bool(r["recent"])
        return rows


# the per-device summaries' GROUP BY in their key order (schema.TABLES) where the cohort key
# allows: SQLite then aggregates as it scans, in sequence, instead of first sorting every
# 64-column row (fleet and model_version); other keys (tier, tag, site, device) sort.
# PostgreSQL hashes either way.
_GROUP = {"'fleet'": "group by t.model_version, t.field, t.chunk",
          "t.model_version": "group by t.model_version, t.field, t.chunk"}


def _summary_from(table: str, join: str) -> str:
    """FROM and WHERE of a per-device summary table as ``t``, with the cohort's joins."""
    return f"from {table} t left join devices d on d.device_id = t.device_id {join} where t.model_version is not null"


def _features_bins(bins: list[list[Any]]) -> list[list[int | float]]:
    """Per feature its bins, from one list per bin of every feature's count (None: absent). A
    feature no bin has is left out; a feature's bins past its last are dropped, a gap counts 0."""
    width = max(map(len, bins), default=0)
    if bins and all(len(b) == width for b in bins) and not any(None in b for b in bins):
        import numpy as np     # here, not at import: `edgeloop status` opens the store and stays light

        counts = np.array(bins, dtype=np.float64).T      # the common case, at numpy's speed
        if np.array_equal(counts, np.floor(counts)):
            return counts.astype(np.int64).tolist()
        return counts.tolist()
    hist = []
    for feature in range(width):
        column = [b[feature] if feature < len(b) else None for b in bins]
        if any(v is not None for v in column):
            hist.append([_whole(x) for x in _trim(column)])
    return hist


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _trim(values: list[Any]) -> list[float]:
    """Positions past every record's array end (NULL) dropped; a NULL inside counts 0."""
    while values and values[-1] is None:
        values.pop()
    return [0.0 if v is None else v for v in values]

