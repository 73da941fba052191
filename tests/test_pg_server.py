"""The private PostgreSQL the store tests run against starts, answers, and stops cleanly."""

from __future__ import annotations

import pytest

from tests.pg_server import PrivatePostgres, available

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL binaries not installed")


def test_a_private_postgres_answers_on_its_own_port_and_goes_away() -> None:
    psycopg = pytest.importorskip("psycopg")
    server = PrivatePostgres()
    with server as url:
        assert server.port != 5432 and url.endswith(f":{server.port}/edgeloop")
        with psycopg.connect(url) as conn:
            assert conn.execute("select 1 + 1").fetchone() == (2,)
            conn.execute("create table t (k int primary key)")
            conn.execute("insert into t values (1)")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    assert not server.root.exists()
