"""The encrypted secret store on SQLite and PostgreSQL, and ``goclaw secrets``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goclaw.agent.runtime import provider_env, stored_secrets
from goclaw.secrets import (
    KEY_ENV,
    EncryptionKeyError,
    SecretDecryptError,
    SecretError,
    SecretStore,
    generate_key,
    load_key,
    parse_key,
)
from goclaw.store.kv import KeyValue

VALUE = "sk-test-0123456789abcdefghijklmnop"


@pytest.fixture
def key() -> bytes:
    return parse_key(generate_key())


def test_round_trip(db, key):
    store = SecretStore(db, key)
    assert store.get("OPENAI_API_KEY") is None
    store.set("OPENAI_API_KEY", VALUE)
    store.set("OTHER", "välue with ünicode")
    assert store.get("OPENAI_API_KEY") == VALUE
    assert SecretStore(db, key).get("OTHER") == "välue with ünicode"
    assert store.names() == ["OPENAI_API_KEY", "OTHER"]
    assert store.items() == {"OPENAI_API_KEY": VALUE, "OTHER": "välue with ünicode"}
    store.set("OPENAI_API_KEY", "replaced-value")
    assert store.get("OPENAI_API_KEY") == "replaced-value"
    assert store.remove("OTHER") is True
    assert store.remove("OTHER") is False
    assert store.names() == ["OPENAI_API_KEY"]


def test_the_value_is_not_stored_in_clear(db, key, database_url, tmp_path):
    store = SecretStore(db, key)
    store.set("OPENAI_API_KEY", VALUE)
    blob = KeyValue(db, "secrets").get("OPENAI_API_KEY")
    assert blob is not None and VALUE.encode() not in blob
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(VALUE) + 16
    store.set("OPENAI_API_KEY", VALUE)
    assert KeyValue(db, "secrets").get("OPENAI_API_KEY")[1:13] != blob[1:13], "fresh nonce"
    if database_url.startswith("sqlite"):
        db.close()
        path = database_url.removeprefix("sqlite:///")
        files = [Path(path), Path(path + "-wal")]
        raw = b"".join(f.read_bytes() for f in files if f.exists())
        assert b"OPENAI_API_KEY" in raw  # the name is not secret, and the file was read
        assert VALUE.encode() not in raw


def test_a_wrong_key_is_a_precise_error(db, key):
    SecretStore(db, key).set("OPENAI_API_KEY", VALUE)
    other = SecretStore(db, parse_key(generate_key()))
    with pytest.raises(SecretDecryptError) as caught:
        other.get("OPENAI_API_KEY")
    assert "OPENAI_API_KEY" in str(caught.value) and KEY_ENV in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_ciphertext_copied_to_another_name_does_not_decrypt(db, key):
    store = SecretStore(db, key)
    store.set("OPENAI_API_KEY", VALUE)
    kv = KeyValue(db, "secrets")
    kv.put("ANTHROPIC_API_KEY", kv.get("OPENAI_API_KEY"))
    with pytest.raises(SecretDecryptError, match="ANTHROPIC_API_KEY"):
        store.get("ANTHROPIC_API_KEY")
    tampered = bytearray(kv.get("OPENAI_API_KEY"))
    tampered[-1] ^= 1
    kv.put("OPENAI_API_KEY", bytes(tampered))
    with pytest.raises(SecretDecryptError, match="OPENAI_API_KEY"):
        store.get("OPENAI_API_KEY")
    kv.put("OPENAI_API_KEY", b"\x02" + bytes(tampered[1:]))
    with pytest.raises(SecretDecryptError, match="version 2"):
        store.get("OPENAI_API_KEY")


def test_a_missing_or_malformed_key_fails_closed(db):
    with pytest.raises(EncryptionKeyError, match=f"{KEY_ENV} is not set"):
        SecretStore.from_env(db, {})
    with pytest.raises(EncryptionKeyError, match="empty"):
        load_key({KEY_ENV: "  "})
    with pytest.raises(EncryptionKeyError, match="base64url") as caught:
        load_key({KEY_ENV: "not a key!"})
    assert "not a key" not in str(caught.value), "the bad key is never echoed"
    short = base64.urlsafe_b64encode(os.urandom(16)).decode()
    with pytest.raises(EncryptionKeyError, match="16 bytes"):
        load_key({KEY_ENV: short})
    with pytest.raises(EncryptionKeyError):
        SecretStore(db, b"x" * 31)
    padded = base64.urlsafe_b64encode(os.urandom(32)).decode()
    assert len(padded) == 44 and len(load_key({KEY_ENV: padded})) == 32
    assert len(generate_key()) == 43


def test_names_are_validated(db, key):
    store = SecretStore(db, key)
    for bad in ("", "lower", "1ABC", "A-B", "A" * 65, "A B"):
        with pytest.raises(SecretError, match="invalid secret name"):
            store.set(bad, VALUE)
    with pytest.raises(SecretError, match="empty"):
        store.set("EMPTY", "")


def test_the_environment_wins_over_the_store(db, key):
    store = SecretStore(db, key)
    store.set("OPENAI_API_KEY", VALUE)
    assert store.resolve("OPENAI_API_KEY", {"OPENAI_API_KEY": "from-env"}) == "from-env"
    assert store.resolve("OPENAI_API_KEY", {"OPENAI_API_KEY": ""}) == VALUE
    assert store.resolve("OPENAI_API_KEY", {}) == VALUE
    assert store.resolve("MISSING", {}) is None


# -- the CLI -------------------------------------------------------------------


@pytest.fixture
def cli(database_url, tmp_path):
    env = {
        **os.environ,
        "GOCLAW_DATABASE_URL": database_url,
        KEY_ENV: generate_key(),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    env.pop("OPENAI_API_KEY", None)
    home = str(tmp_path / "home")

    def run(*args, input=None, check=True, **extra):
        result = subprocess.run(
            [sys.executable, "-m", "goclaw.cli", "--home", home, "secrets", *args],
            input=input,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    run.env = env
    return run


def test_cli_set_list_remove(cli, database_url):
    assert "stored secret OPENAI_API_KEY" in cli("set", "OPENAI_API_KEY", input=VALUE + "\n").stdout
    cli("set", "SLACK_TOKEN", input="xoxb-0123456789-abcdef")
    listed = cli("list")
    assert listed.stdout.split() == ["OPENAI_API_KEY", "SLACK_TOKEN"]
    listed_json = cli("list", "--json")
    assert json.loads(listed_json.stdout) == ["OPENAI_API_KEY", "SLACK_TOKEN"]
    for out in (listed, listed_json):
        assert VALUE not in out.stdout + out.stderr

    from goclaw.store.database import Database

    db = Database(database_url)
    try:
        store = SecretStore(db, load_key(cli.env))
        assert store.get("OPENAI_API_KEY") == VALUE  # the trailing newline was dropped
    finally:
        db.close()

    assert "removed secret SLACK_TOKEN" in cli("remove", "SLACK_TOKEN").stdout
    assert cli("list", "--json").stdout.strip() == '["OPENAI_API_KEY"]'
    missing = cli("remove", "SLACK_TOKEN", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr

    wrong = cli("list", check=False, **{KEY_ENV: "short"})
    assert wrong.returncode == 1 and "malformed" in wrong.stderr and "Traceback" not in wrong.stderr


def test_cli_without_a_key_fails_closed(cli):
    env = {k: v for k, v in cli.env.items() if k != KEY_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "goclaw.cli", "secrets", "set", "OPENAI_API_KEY"],
        input=VALUE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{KEY_ENV} is not set" in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_a_bad_name_and_never_takes_a_value_argument(cli):
    bad = cli("set", "lower", input=VALUE, check=False)
    assert bad.returncode == 1 and "invalid secret name" in bad.stderr
    extra = cli("set", "OPENAI_API_KEY", VALUE, check=False)
    assert extra.returncode == 2 and VALUE not in cli("list").stdout


def test_cli_keygen(cli):
    first = cli("keygen").stdout.strip()
    second = cli("keygen").stdout.strip()
    assert first != second
    assert len(parse_key(first)) == 32 and len(parse_key(second)) == 32


def test_provider_keys_come_from_the_environment_first_then_the_store(db):
    env = {KEY_ENV: generate_key(), "SET_IN_ENV": "from-the-environment", "EMPTY_IN_ENV": ""}
    store = SecretStore.from_env(db, env)
    for name in ("SET_IN_ENV", "EMPTY_IN_ENV", "ONLY_STORED"):
        store.set(name, f"stored-{name.lower()}")
    merged = provider_env(env, stored_secrets(db, env))
    assert merged["SET_IN_ENV"] == "from-the-environment"
    assert merged["EMPTY_IN_ENV"] == "stored-empty_in_env"
    assert merged["ONLY_STORED"] == "stored-only_stored"
    assert stored_secrets(db, {}) == {}, "no key, no store: nothing read, nothing fails"
