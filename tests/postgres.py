"""A fresh PostgreSQL schema per test, for the tests of anything that runs on PostgreSQL.

The server is ``BATCHEXEC_TEST_POSTGRES_URL`` (by default the local one, user
``postgres``, database ``test``). Each schema, ``batchexec_test_<random hex>``,
is created for the test and dropped with everything in it after; a URL to
it sets ``search_path``. A test that asks for one is skipped when no server
answers within 2 s.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
_REACH_TIMEOUT_S = 2.0

#: Makes another fresh schema and returns a URL to it.
MakePostgresUrl = Callable[[], Awaitable[str]]


def base_url() -> str:
    """The test server's URL, without a schema."""
    return os.environ.get("BATCHEXEC_TEST_POSTGRES_URL", DEFAULT_URL)


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema`` as its search path (asyncpg sends it as a setting)."""
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


def _where(url: str) -> str:
    """``url``'s host and port, without its user and password."""
    return url.partition("://")[2].partition("/")[0].rpartition("@")[2] or url


async def _connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    try:
        return await asyncio.wait_for(
            asyncpg.connect(url, timeout=_REACH_TIMEOUT_S), _REACH_TIMEOUT_S
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join((str(exc) or type(exc).__name__).split())
        pytest.skip(f"PostgreSQL is not reachable at {_where(url)}: {reason}")


@pytest.fixture
async def make_postgres_url() -> AsyncIterator[MakePostgresUrl]:
    """Makes fresh schemas on the test server; every one is dropped after the test."""
    base = base_url()
    schemas: list[str] = []

    async def make() -> str:
        schema = f"batchexec_test_{secrets.token_hex(6)}"
        conn = await _connect(base)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()
        schemas.append(schema)
        return with_schema(base, schema)

    yield make
    if schemas:
        conn = await _connect(base)
        try:
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def postgres_url(make_postgres_url: MakePostgresUrl) -> str:
    """A URL to a fresh schema of the test server, dropped after the test."""
    return await make_postgres_url()
