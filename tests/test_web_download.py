"""The download route never serves a file outside the results folder, or another key's file."""

from __future__ import annotations

import asyncio

import pytest

from batchexec.api import PROCESS_CSV, download_path
from tests.helpers import API_KEY, AUTH, finished, submit

SECRET = b"TOP-SECRET-OUTSIDE-THE-RESULTS-FOLDER"


async def raw_get(client, target: bytes, key: bytes = API_KEY.encode()) -> tuple[int, bytes]:
    """Send a request line exactly as given, so no client normalises the path."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: test\r\nIntegrations-API-Key: "
        + key
        + b"\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


@pytest.fixture
async def served(make_client, tmp_path):
    """A client with one finished batch, and secrets planted around the results folder."""
    client = await make_client()
    body = await finished(client, await submit(client, [{"prompt": "hi", "model": "echo"}]))
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "public" / "secret.txt").write_bytes(SECRET)
    results_dir = tmp_path / "public" / "batch_execution_results"
    (results_dir / "link.xlsx").symlink_to(tmp_path / "secret.txt")
    return client, body["xlsx_url"].rsplit("/", 1)[1]


@pytest.mark.parametrize(
    "target",
    [
        download_path(name).encode()
        for name in [
            "../secret.txt",
            "../../secret.txt",
            "..%2fsecret.txt",
            "..%2F..%2Fsecret.txt",
            "%2e%2e%2fsecret.txt",
            "..%5csecret.txt",
            "%2Fetc%2Fpasswd",
            "/etc/passwd",
            "link.xlsx",
            ".gitkeep",
            "%00",
            "",
        ]
    ],
)
async def test_traversal_never_leaves_the_results_folder(served, target):
    client, _ = served
    status, body = await raw_get(client, target)
    assert status in (400, 404)
    assert SECRET not in body
    assert b"root:" not in body


async def test_own_file_downloads(served):
    client, name = served
    status, body = await raw_get(client, download_path(name).encode())
    assert status == 200
    assert body.startswith(b"PK")


async def test_download_needs_a_key(served):
    client, name = served
    response = await client.get(download_path(name))
    assert response.status == 401
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 200


async def test_a_batch_workbook_removed_from_disk_is_made_again(served, tmp_path):
    client, name = served
    path = tmp_path / "public" / "batch_execution_results" / name
    original = path.read_bytes()
    path.unlink()
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 200
    again = await response.read()
    assert again.startswith(b"PK")
    assert path.read_bytes() == again
    assert len(again) == len(original)


async def test_a_template_removed_from_disk_is_404(make_client, tmp_path):
    client = await make_client()
    response = await client.post(PROCESS_CSV, json={"csv_content": "prompt\nhi\n"}, headers=AUTH)
    name = (await response.json())["xlsx_path"].rsplit("/", 1)[1]
    (tmp_path / "public" / "batch_execution_results" / name).unlink()
    response = await client.get(download_path(name), headers=AUTH)
    assert response.status == 404
    assert await response.json() == {"detail": "File not found"}
