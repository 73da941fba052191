"""Store operations on the catalog: data sets, runs, lineage, model versions, artifacts,
packages, updates and pipeline runs (private to cloud.store; see cloud.store.interface)."""

from __future__ import annotations

import json
import time
from typing import Any

from edgeloop.cloud.errors import IntegrityError, NotFound
from edgeloop.cloud.store._base import SqliteBase, decode, dumps
from edgeloop.cloud.store.schema import TABLES

_RUN_JSON = ("params", "dist", "code", "environment", "hardware", "metrics", "history")
_RUN_COLUMNS = frozenset(c for c, _ in TABLES["runs"][0]) - {"run_id"}

# a training run's status: from -> the statuses it may move to (every other move is refused)
RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    "running": frozenset({"succeeded", "failed", "interrupted"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "interrupted": frozenset(),
}
_VERSION_JSON = ("features", "labels", "metrics", "arch", "task")


class CatalogOps(SqliteBase):
    # -- data sets and runs ----------------------------------------------------------------
    def add_dataset(self, name: str, sha256: str, path: str, files: list, schema: dict) -> tuple[str, bool]:
        """Register a data set version; the same content under the same name is not registered twice.
        Returns (dataset_id, created)."""
        with self._lock:
            latest = self._one("select dataset_id, sha256 from datasets where name = ? "
                               "order by version desc limit 1", [name])
            if latest and latest["sha256"] == sha256:
                return latest["dataset_id"], False
            version = int(self._scalar("select coalesce(max(version), 0) from datasets where name = ?", [name])) + 1
            dataset_id = f"{name}:{version}"
            self._db["datasets"].insert({"dataset_id": dataset_id, "name": name, "version": version,
                                         "sha256": sha256, "path": path, "files": dumps(files),
                                         "schema": dumps(schema), "added_at": time.time()}, pk="dataset_id")
            return dataset_id, True

    def dataset(self, ref: str) -> dict[str, Any]:
        """A data set by ``name`` (latest version) or ``name:version``. Raises NotFound."""
        name, _, version = ref.partition(":")
        sql, args = "select * from datasets where name = ?", [name]
        if version:
            sql, args = sql + " and version = ?", args + [version]
        row = self._one(sql + " order by version desc limit 1", args)
        if row is None:
            raise NotFound(f"no registered data set {ref!r} (register one: edgeloop data add NAME PATH)")
        return decode(row, "files", "schema")

    def datasets(self) -> list[dict[str, Any]]:
        return [decode(r, "files", "schema") for r in self._rows("select * from datasets order by name, version")]

    def start_run(self, row: dict[str, Any]) -> None:
        """Record a run as ``running`` (``pid`` and ``host``: the process training it)."""
        with self._lock:
            self._db["runs"].insert({**row, "status": "running",
                                     **{k: dumps(row[k]) for k in _RUN_JSON if k in row}}, pk="run_id")

    def finish_run(self, run_id: str, **fields: Any) -> None:
        """End a run: ``status`` (succeeded, failed or interrupted) and any other fields. Raises
        NotFound, or IntegrityError for a move :data:`RUN_TRANSITIONS` does not allow (a run
        already ended, for example marked interrupted while its process looked gone)."""
        status = fields.get("status")
        with self._tx() as conn:
            current = conn.execute("select status from runs where run_id = ?", [run_id]).fetchone()
            if current is None:
                raise NotFound(f"no run {run_id!r} (see: edgeloop runs ls)")
            if status is not None and status not in RUN_TRANSITIONS.get(current[0], frozenset()):
                raise IntegrityError(f"run {run_id} is {current[0]}: it cannot become {status}")
            values = {**fields, **{k: dumps(fields[k]) for k in _RUN_JSON if k in fields}, "ended_at": time.time()}
            names = [n for n in values if n in _RUN_COLUMNS]
            if len(names) != len(values):
                raise ValueError(f"runs has no column {sorted(set(values) - _RUN_COLUMNS)}")
            conn.execute(f"update runs set {', '.join(f'{n} = ?' for n in names)} where run_id = ?",
                         [values[n] for n in names] + [run_id])

    def interrupt_run(self, run_id: str, reason: str) -> bool:
        """Mark a ``running`` run ``interrupted`` with ``reason``. False (nothing changed) when it is
        not running any more: the move happens once, however many processes try it."""
        with self._tx() as conn:
            cur = conn.execute("update runs set status = 'interrupted', reason = ?, ended_at = ? "
                               "where run_id = ? and status = 'running'", [reason, time.time(), run_id])
            return cur.rowcount == 1

    def running_runs(self) -> list[dict[str, Any]]:
        """The runs recorded as ``running``: run_id, pid, host, started_at."""
        return self._rows("select run_id, pid, host, started_at from runs where status = 'running' "
                          "order by started_at")

    def run(self, run_id: str) -> dict[str, Any]:
        """Raises NotFound."""
        row = self._one("select * from runs where run_id = ?", [run_id])
        if row is None:
            raise NotFound(f"no run {run_id!r} (see: edgeloop runs ls)")
        return decode(row, *_RUN_JSON)

    def runs(self) -> list[dict[str, Any]]:
        return [decode(r, *_RUN_JSON) for r in self._rows("select * from runs order by started_at")]

    def count_runs(self) -> int:
        return int(self._scalar("select count(*) from runs"))

    # -- lineage ---------------------------------------------------------------------------
    def add_edge(self, src: str, dst: str, relation: str) -> None:
        with self._lock:
            self._db["lineage"].upsert({"src": src, "dst": dst, "relation": relation, "created_at": time.time()},
                                       pk=("src", "dst", "relation"))

    def parents(self, node: str) -> list[dict[str, Any]]:
        return self._rows("select src, relation from lineage where dst = ? order by created_at desc", [node])

    # -- model versions ----------------------------------------------------------------------
    def set_stage(self, model_version: str, stage: str) -> None:
        with self._lock:
            self._db["model_versions"].update(model_version, {"stage": stage})

    def set_task(self, model_version: str, task: dict[str, Any]) -> None:
        """Replace a model version's task description (``{"kind": ...}``)."""
        with self._tx() as conn:
            conn.execute("update model_versions set task = ? where model_version = ?", [dumps(task), model_version])

    def in_stage(self, model: str, stage: str) -> list[str]:
        return [r["model_version"] for r in self._rows(
            "select model_version from model_versions where model = ? and stage = ? order by version", [model, stage])]

    def next_version(self, model: str) -> int:
        return int(self._scalar("select max(version) from model_versions where model = ?", [model]) or 0) + 1

    def add_model_version(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._db["model_versions"].insert(
                {**row, **{k: dumps(row[k]) for k in _VERSION_JSON if k in row}, "created_at": time.time()},
                pk="model_version")

    def model_version(self, model_version: str) -> dict[str, Any]:
        """Raises NotFound."""
        row = self._one("select * from model_versions where model_version = ?", [model_version])
        if row is None:
            raise NotFound(f"no model version {model_version!r} (see: edgeloop models)")
        return decode(row, *_VERSION_JSON)

    def latest_model_version(self) -> str | None:
        return self._scalar("select model_version from model_versions order by created_at desc limit 1")

    def model_versions(self) -> list[dict[str, Any]]:
        return self._rows("select model_version, model, version, stage, run_id, metrics, created_at "
                          "from model_versions order by created_at")

    def count_model_versions(self) -> int:
        return int(self._scalar("select count(*) from model_versions"))

    def task_of(self, model_version: str) -> dict[str, Any]:
        """The model version's task (``{}`` when unknown)."""
        task = self._scalar("select task from model_versions where model_version = ?", [model_version])
        return json.loads(task) if task else {}

    # -- artifacts, packages, updates ----------------------------------------------------------
    def add_artifact(self, sha256: str, kind: str, length: int, path: str) -> None:
        with self._lock:
            self._db["artifacts"].upsert({"sha256": sha256, "kind": kind, "length": length, "path": path,
                                          "created_at": time.time()}, pk="sha256")

    def artifact_path(self, sha256: str) -> str:
        """Raises NotFound."""
        path = self._scalar("select path from artifacts where sha256 = ?", [sha256])
        if path is None:
            raise NotFound(f"no artifact {sha256[:12]}")
        return path

    def add_package(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._db["packages"].upsert({**row, "created_at": time.time()}, pk="sha256")

    def package(self, sha256: str) -> dict[str, Any]:
        """Raises NotFound."""
        row = self._one("select * from packages where sha256 = ?", [sha256])
        if row is None:
            raise NotFound(f"no package {sha256[:12]}")
        return row

    def package_for(self, model_version: str, tier: str) -> dict[str, Any]:
        """The newest package of ``model_version`` for ``tier``. Raises NotFound."""
        row = self._one("select * from packages where model_version = ? and tier = ? "
                        "order by created_at desc limit 1", [model_version, tier])
        if row is None:
            raise NotFound(f"no {tier} package for {model_version} (run: edgeloop package {model_version} --tier {tier})")
        return row

    def packages_of(self, model_version: str) -> list[dict[str, Any]]:
        """Every package of ``model_version``, newest first."""
        return self._rows("select * from packages where model_version = ? order by created_at desc",
                          [model_version])

    def packages_named(self, target: str) -> list[str]:
        """The sha256 of every package registered under this target name."""
        return [r["sha256"] for r in self._rows("select sha256 from packages where target = ?", [target])]

    def count_packages(self) -> int:
        return int(self._scalar("select count(*) from packages"))

    def set_package_length(self, sha256: str, length: int) -> None:
        """Record another length for a package (what an operator's mistake or an attacker with
        the database would do; the release path must not trust it)."""
        with self._tx() as conn:
            conn.execute("update packages set length = ? where sha256 = ?", [length, sha256])

    def upsert_update(self, row: dict[str, Any]) -> None:
        """Record an update, replacing one with the same id (signing the same update again)."""
        with self._lock:
            self._db["updates"].upsert(row, pk="update_id")

    def updates(self) -> list[dict[str, Any]]:
        return self._rows("select * from updates order by issued_at")

    def update(self, update_id: str) -> dict[str, Any] | None:
        return self._one("select * from updates where update_id = ?", [update_id])

    # -- pipeline runs and their cached steps ----------------------------------------------------
    def pipeline_step_output(self, key: str) -> dict[str, Any] | None:
        output = self._scalar("select output from pipeline_steps where key = ?", [key])
        return json.loads(output) if output is not None else None

    def pipeline_step_outputs(self, step: str) -> list[dict[str, Any]]:
        return [json.loads(r["output"]) for r in self._rows("select output from pipeline_steps where step = ?",
                                                             [step])]

    def remember_pipeline_step(self, key: str, step: str, output: dict[str, Any]) -> None:
        with self._lock:
            self._db["pipeline_steps"].upsert({"key": key, "step": step, "output": json.dumps(output),
                                               "created_at": time.time()}, pk="key")

    def record_pipeline_run(self, row: dict[str, Any]) -> None:
        """Insert or replace a pipeline run (``steps`` a list, stored as JSON)."""
        with self._lock:
            self._db["pipeline_runs"].upsert({**row, "steps": json.dumps(row.get("steps", []))}, pk="run_id")

    def pipeline_runs(self) -> list[dict[str, Any]]:
        rows = self._rows("select * from pipeline_runs order by started_at desc")
        for row in rows:
            row["steps"] = json.loads(row["steps"] or "[]")
        return rows
