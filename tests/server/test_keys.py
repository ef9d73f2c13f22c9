"""API keys without a server: the token format, the SQLite key store, the `avatar keys`
commands, and the rate limiters the server uses."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import _register_commands
from server.cli import app as cli_app
from server.keys import KeyStoreError, SqliteKeyStore, hash_token, token_key_id
from server.limits import MemoryRateCounter, TokenBucket

_register_commands()


def test_tokens_are_random_and_only_their_hash_is_stored(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path)
    key, token = store.create("alice laptop")
    other, other_token = store.create("bob")
    assert token.startswith(f"avk_{key.id}_") and token_key_id(token) == key.id
    assert token != other_token and key.id != other.id

    assert store.verify(token) == key
    assert store.verify(other_token) == other
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify("not a token") is None
    assert store.verify(f"avk_{key.id}_" + "x" * 43) is None  # right id, wrong secret

    # the file holds the hash, never the token
    raw = (tmp_path / "keys.sqlite").read_bytes()
    assert token.encode() not in raw and token.split("_")[-1].encode() not in raw
    row = sqlite3.connect(tmp_path / "keys.sqlite").execute(
        "SELECT token_sha256 FROM api_keys WHERE id = ?", (key.id,)
    ).fetchone()
    assert row[0] == hash_token(token)
    store.close()


def test_revoked_keys_stop_working_and_stay_listed(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path)
    key, token = store.create("temp")
    revoked = store.revoke(key.id)
    assert revoked is not None and not revoked.active
    assert store.verify(token) is None
    assert store.revoke(key.id) == revoked  # idempotent
    assert store.revoke("000000000000") is None
    assert [k.id for k in store.list()] == [key.id]
    assert store.count_active() == 0

    # another process (another connection) sees it
    again = SqliteKeyStore(tmp_path)
    assert again.verify(token) is None
    again.close()
    store.close()


@pytest.mark.parametrize("name", ["", "x" * 65, "semi;colon", "new\nline"])
def test_bad_key_names_are_refused(tmp_path: Path, name: str) -> None:
    store = SqliteKeyStore(tmp_path)
    with pytest.raises(KeyStoreError, match="key name: expected"):
        store.create(name)
    store.close()


def test_keys_commands(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AVATAR_STORE_URL", raising=False)
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]

    created = runner.invoke(cli_app, ["keys", "create", "--name", "ci", "--json", *data])
    assert created.exit_code == 0, created.output
    made = json.loads(created.stdout)
    assert made["key"].startswith("avk_") and made["name"] == "ci"

    plain = runner.invoke(cli_app, ["keys", "create", "--name", "second", *data])
    assert plain.exit_code == 0 and plain.stdout.strip().startswith("avk_")

    listed = runner.invoke(cli_app, ["keys", "list", "--json", *data])
    keys = json.loads(listed.stdout)
    assert [k["name"] for k in keys] == ["ci", "second"]
    assert all("key" not in k for k in keys) and made["key"] not in listed.stdout

    revoked = runner.invoke(cli_app, ["keys", "revoke", made["id"], *data])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    table = runner.invoke(cli_app, ["keys", "list", *data])
    assert "revoked" in table.stdout and "active" in table.stdout

    unknown = runner.invoke(cli_app, ["keys", "revoke", "abcdefabcdef", *data])
    assert unknown.exit_code == 1 and "no API key" in unknown.output
    bad = runner.invoke(cli_app, ["keys", "create", "--name", "a;b", *data])
    assert bad.exit_code == 1 and "key name" in bad.output
    unreachable = runner.invoke(
        cli_app, ["keys", "list", "--store-url", "redis://127.0.0.1:1/0"]
    )
    assert unreachable.exit_code == 2 and "cannot reach Redis" in unreachable.output


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5)
    assert all(bucket.take(0.0) for _ in range(5))
    assert not bucket.take(0.0)
    assert bucket.take(0.1)  # one token back after 1/10 s
    assert not bucket.take(0.1)
    assert all(bucket.take(10.0) for _ in range(5))  # refilled, but only to the burst
    assert not bucket.take(10.0)
    unlimited = TokenBucket(rate=0.0, burst=1)
    assert all(unlimited.take(0.0) for _ in range(1000))


def test_memory_rate_counter_counts_per_name() -> None:
    counter = MemoryRateCounter()
    assert [counter.hit("a", 2, 60.0) for _ in range(2)] == [None, None]
    wait = counter.hit("a", 2, 60.0)
    assert wait is not None and 0 < wait <= 60.0
    assert counter.hit("b", 2, 60.0) is None
    assert counter.hit("c", 1, 0.01) is None
