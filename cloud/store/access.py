"""Store operations on alerts, API tokens and the audit log (private to cloud.store; see cloud.store.interface)."""

from __future__ import annotations

import time
from typing import Any

from edgeloop.cloud.store._base import SqliteBase, decode, dumps

_TOKEN_COLUMNS = "token_id, name, role, created_at, revoked_at, last_used_at, expires_at"


class AccessOps(SqliteBase):
    # -- alerts ------------------------------------------------------------------------------
    def add_alert(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._db["alerts"].insert({**row, "created_at": time.time()})

    def alerts(self) -> list[dict[str, Any]]:
        return self._rows("select * from alerts order by id")

    # -- API tokens (only the sha256 of a token is stored) ----------------------------------------
    def add_token(self, row: dict[str, Any], now: float) -> bool:
        """Store a token (token_id, name, role, sha256, created_at, expires_at) unless an active
        one (not revoked, not expired at ``now``) has its name. Returns whether it was stored."""
        with self._tx() as conn:
            if conn.execute("select 1 from api_tokens where name = ? and revoked_at is null "
                            "and (expires_at is null or expires_at > ?)", [row["name"], now]).fetchone():
                return False
            conn.execute("insert into api_tokens (token_id, name, role, sha256, created_at, expires_at) "
                         "values (:token_id, :name, :role, :sha256, :created_at, :expires_at)", row)
        return True

    def tokens(self) -> list[dict[str, Any]]:
        return self._rows(f"select {_TOKEN_COLUMNS} from api_tokens order by created_at")

    def revoke_token(self, ref: str, now: float) -> tuple[dict[str, Any], bool] | None:
        """Revoke the token with this id or name (an active one first, else the newest). Returns
        (its row as it was, whether it was already revoked), or None if there is none."""
        with self._tx() as conn:
            rows = self._rows(f"select {_TOKEN_COLUMNS} from api_tokens where token_id = ? or name = ? "
                              "order by revoked_at is null desc, created_at desc limit 1", [ref, ref])
            if not rows:
                return None
            if rows[0]["revoked_at"] is not None:
                return rows[0], True
            conn.execute("update api_tokens set revoked_at = ? where token_id = ?", [now, rows[0]["token_id"]])
        return rows[0], False

    def use_token(self, sha256: str, now: float) -> dict[str, Any] | None:
        """The active token with this hash, its last use set to ``now``; None if there is none."""
        with self._lock:
            rows = self._rows(f"select {_TOKEN_COLUMNS} from api_tokens where sha256 = ? and revoked_at is null "
                              "and (expires_at is null or expires_at > ?)", [sha256, now])
            if not rows:
                return None
            with self._tx() as conn:
                conn.execute("update api_tokens set last_used_at = ? where token_id = ?", [now, rows[0]["token_id"]])
        return rows[0]

    # -- the audit log (operators' actions) -------------------------------------------------------
    def add_audit(self, row: dict[str, Any]) -> None:
        """Append one action: ``ts``, ``actor``, ``action``, ``subject``, ``detail`` (a dict)."""
        with self._tx() as conn:
            conn.execute("insert into audit (ts, actor, action, subject, detail) values (?, ?, ?, ?, ?)",
                         [row["ts"], row["actor"], row["action"], row["subject"], dumps(row.get("detail") or {})])

    def audit(self, since: float | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The recorded actions, oldest first (``since``: at or after that time; ``action``: only
        that one), ``detail`` decoded."""
        where, args = ["1 = 1"], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if action is not None:
            where.append("action = ?")
            args.append(action)
        rows = self._rows(f"select id, ts, actor, action, subject, detail from audit where {' and '.join(where)} "
                          "order by ts, id", args)
        return [decode(r, "detail") for r in rows]
