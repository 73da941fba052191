"""Store operations for the drift report: the per-cohort merge of the devices' mergeable telemetry
summaries, computed by the database (private to cloud.store; see cloud.store.interface).

A telemetry record carries its window's feature summary (``features``: per-feature histogram
bins ``hist``, and ``n``, ``missing``, ``sum``, ``sumsq``, ``min``, ``max``, the residual sums
``rn``, ``rsum``, ``rsumsq``) and prediction counts. Counts and sums add and minima and maxima
combine, so a cohort's summary is a handful of ``GROUP BY`` aggregates over the JSON arrays'
elements (SQLite's ``json_each``, PostgreSQL's ``jsonb_array_elements_text``): no record's JSON
crosses into Python, whatever the fleet's size. The same merge as
``cloud.drift.monitor.merge`` (residual sums only where every record of the cohort has them).

Cohorts (``by``): ``device``, ``tier``, ``tag`` (a device with two tags is in two cohorts; one
with none in ``(untagged)``), ``site`` (the ``site`` tag, ``?`` without), ``model_version``,
``fleet``; always per model version. Operator label feedback replaces a window's label counts
as in :meth:`FleetOps.drift_rows`.
"""

from __future__ import annotations

from typing import Any

from edgeloop.cloud.store._base import SqliteBase

__all__ = ["DriftOps", "SQL_COHORTS"]

SQL_COHORTS = ("device", "tier", "tag", "site", "model_version", "fleet")
_SUMMED = ("n", "missing", "sum", "sumsq", "rsum", "rsumsq")
_FIELDS = (*_SUMMED, "min", "max")

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
        key and model version."""
        key, join = self._cohort(by)
        pg = self.dialect.name == "postgresql"
        has_rsum = "(t.features::jsonb->'rsum') is not null" if pg else "json_type(t.features, '$.rsum') is not null"
        rn = "(t.features::jsonb->>'rn')::float8" if pg else "json_extract(t.features, '$.rn')"
        totals = self._rows(
            f"select {key} as key, t.model_version as model_version, count(*) as records, "
            f"coalesce(sum(t.count), 0) as inferences, coalesce(sum({_LABELLED}), 0) as labelled, "
            f"coalesce(sum({_CORRECT}), 0) as correct, count({_ERR}) as err_records, sum({_ERR}) as abs_err_sum, "
            f"coalesce(sum(case when {_ERR} is not null then {_LABELLED} else 0 end), 0) as err_labelled, "
            "count(t.features) as featured, "
            f"coalesce(sum(case when t.features is not null and {has_rsum} then 1 else 0 end), 0) as residual, "
            f"coalesce(sum(case when t.features is not null and {has_rsum} then {rn} else 0 end), 0) as rn "
            + self._from(join) + "where t.model_version is not null group by 1, 2 order by 1, 2")
        if pg:
            items = ("cross join lateral jsonb_array_elements_text(case when jsonb_typeof(t.predictions::jsonb) = "
                     "'array' then t.predictions::jsonb else '[]'::jsonb end) with ordinality p(value, i)")
            index, value = "p.i - 1", "p.value::float8"
        else:
            items, index, value = ", json_each(t.predictions) p", "p.key", "p.value"
        preds: dict[tuple[str, str], dict[int, float]] = {}
        for r in self._rows(f"select {key} as key, t.model_version as mv, {index} as i, sum({value}) as s "
                            + self._from(join) + items + " where t.model_version is not null and "
                            "t.predictions is not null group by 1, 2, 3"):
            preds.setdefault((r["key"], r["mv"]), {})[int(r["i"])] = r["s"]
        for row in totals:
            counts = preds.get((row["key"], row["model_version"]))
            row["predictions"] = [_whole(counts[i]) for i in range(max(counts) + 1)] if counts else None
        return totals

    def drift_cohort_features(self, by: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Per (cohort key, model version) the merged feature summary of its records that have
        one: ``hist`` (per feature, the bins added), ``n``, ``missing``, ``sum``, ``sumsq`` (added),
        ``min``, ``max`` (combined) and ``rsum``, ``rsumsq`` (added; the caller keeps them only
        where every record has them, see :meth:`drift_cohort_totals`). Lists, not arrays.

        One aggregate column per array position (the widths read first), grouped by cohort and
        field (and feature, for the bins): a few rows per cohort to group, not one per element."""
        key, join = self._cohort(by)
        pg = self.dialect.name == "postgresql"
        fields = ", ".join(f"'{f}'" for f in _FIELDS)
        base = " where t.model_version is not null and t.features is not null"
        if pg:
            arrays = ", lateral jsonb_each(t.features::jsonb) a(field, arr)"
            field, arr, length = "a.field", "a.arr", "jsonb_array_length"
            bins = (", lateral jsonb_array_elements(case when jsonb_typeof(t.features::jsonb->'hist') = 'array' "
                    "then t.features::jsonb->'hist' else '[]'::jsonb end) with ordinality h(arr, f)")
            feature, bin_arr = "h.f - 1", "h.arr"
            arrays_where = base + f" and {field} in ({fields}) and jsonb_typeof(a.arr) = 'array'"
            bins_where = base + " and jsonb_typeof(h.arr) = 'array'"
            item = lambda a, j: f"({a}->>{j})::float8"   # noqa: E731
        else:
            arrays = ", json_each(t.features) a"
            field, arr, length = "a.key", "a.value", "json_array_length"
            bins = ", json_each(t.features, '$.hist') h"
            feature, bin_arr = "h.key", "h.value"
            arrays_where = base + f" and {field} in ({fields}) and a.type = 'array'"
            bins_where = base + " and h.type = 'array'"
            item = lambda a, j: f"({a} ->> {j})"   # noqa: E731
        width = self._scalar(f"select max({length}({arr})) from telemetry t{arrays}{arrays_where}") or 0
        nbins = self._scalar(f"select max({length}({bin_arr})) from telemetry t{bins}{bins_where}") or 0
        if not width:
            return {}
        parts: dict[tuple[str, str], dict[str, list[float]]] = {}
        summed = ", ".join(f"'{f}'" for f in _SUMMED)
        for agg, names in (("sum", summed), ("min", "'min'"), ("max", "'max'")):
            cols = ", ".join(f"{agg}({item(arr, j)})" for j in range(width))
            for r in self._conn_rows(f"select {key}, t.model_version, {field}, {cols} " + self._from(join) + arrays
                                     + arrays_where + f" and {field} in ({names}) group by 1, 2, 3"):
                parts.setdefault((r[0], r[1]), {})[r[2]] = _trim(list(r[3:]))
        hists: dict[tuple[str, str], dict[int, list[float]]] = {}
        if nbins:
            sums = ", ".join(f"sum({item(bin_arr, j)})" for j in range(nbins))
            for r in self._conn_rows(f"select {key}, t.model_version, {feature}, {sums} " + self._from(join) + bins
                                     + bins_where + " group by 1, 2, 3"):
                hists.setdefault((r[0], r[1]), {})[int(r[2])] = _trim(list(r[3:]))
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for cohort, summary in parts.items():
            feature_bins = hists.get(cohort, {})
            out[cohort] = {**summary, "hist": [[_whole(x) for x in feature_bins[f]] for f in sorted(feature_bins)]}
        return out

    def _conn_rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self._retrying(lambda: self._locked_fetch(sql))

    def _locked_fetch(self, sql: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self._conn.execute(sql, ()).fetchall()]

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
            f"case when {recent} then r.predictions end as predictions, "
            f"case when {recent} then r.features end as features from (select "
            f"{key} as key, t.device_id, t.seq, t.model_version, t.window_end, t.count, t.predictions, t.features, "
            f"{_ERR} as abs_err_sum, {_LABELLED} as labelled, {_CORRECT} as correct, "
            "coalesce(d.tier, '?') as tier, d.tags as tags, "
            f"row_number() over ({part} order by {order}) as rank_first, "
            f"row_number() over ({part} order by t.window_end desc, t.device_id desc, t.seq desc) as rank_last, "
            f"count(*) over ({part}) as records "
            + self._from(join) + "where t.model_version is not null) r "
            f"where r.rank_first = 1 or {recent} order by r.key, r.model_version, r.window_end, r.device_id, r.seq",
            [int(newest)] * 4)
        for r in rows:
            r["first"], r["recent"] = r.pop("rank_first") == 1, bool(r["recent"])
        return rows


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _trim(values: list[Any]) -> list[float]:
    """Positions past every record's array end (NULL) dropped; a NULL inside counts 0."""
    while values and values[-1] is None:
        values.pop()
    return [0.0 if v is None else v for v in values]

