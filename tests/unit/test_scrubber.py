"""The scrubber: configured secret values and credential-shaped strings become [REDACTED]."""

from __future__ import annotations

import time

import pytest

from goclaw.redact import MIN_VALUE_LENGTH, REDACTED, Scrubber

# Built by concatenation so this file itself does not look like it leaks credentials.
OPENAI = "sk-" + "proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv"
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_TEMP = "ASIA" + "IOSFODNN7EXAMPLE"
GH_CLASSIC = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GH_FINE = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SLACK_BOT = "xoxb-" + "1234567890-0987654321-AbCdEfGhIj"
SLACK_USER = "xoxp-" + "1234567890-0987654321-AbCdEfGhIj"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MxszR6X\n"
    "-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    "secret",
    [OPENAI, AWS, AWS_TEMP, GH_CLASSIC, GH_FINE, SLACK_BOT, SLACK_USER, PEM],
    ids=["openai", "aws", "aws-temp", "github", "github-pat", "slack-bot", "slack-user", "pem"],
)
def test_each_credential_shape_is_redacted(secret):
    text = f"before {secret} after\n"
    assert Scrubber().scrub(text) == f"before {REDACTED} after\n"
    assert Scrubber().scrub(f"'{secret}'") == f"'{REDACTED}'"


def test_a_private_key_block_without_its_end_is_redacted_to_the_end():
    text = "key:\n" + PEM.split("-----END")[0] + "more base64 lines"
    assert Scrubber().scrub(text) == "key:\n" + REDACTED


def test_labels_stay_and_their_credentials_go():
    scrub = Scrubber().scrub
    assert scrub("Authorization: Bearer abcDEF0123456789.xyz-_~+/==") == (
        f"Authorization: Bearer {REDACTED}"
    )
    assert scrub("authorization: bearer abcdefghijklmnopqrstu") == (
        f"authorization: bearer {REDACTED}"
    )
    assert (
        scrub("postgresql://app:hunter2@db:5432/prod")
        == f"postgresql://app:{REDACTED}@db:5432/prod"
    )
    assert scrub("GET /login?user=bob&password=hunter2&next=/") == (
        f"GET /login?user=bob&password={REDACTED}&next=/"
    )
    for label in ("PASSWORD", "passwd", "pwd", "secret", "token", "api_key", "apikey"):
        assert scrub(f"x?{label}=s3cr3t;y") == f"x?{label}={REDACTED}"
    assert scrub("access_token=abc&client_secret=def") == (
        f"access_token={REDACTED}&client_secret={REDACTED}"
    )


def test_look_alikes_are_left_alone():
    scrub = Scrubber().scrub
    for text in (
        "task-sk-12 risk-assessment",  # `sk-` inside a word, and too short
        "Bearer token",  # too short to be a token
        "unbearer abcdefghijklmnopqrstuvwxyz",
        "max_tokens=100 mypassword=x tokens=5",
        "https://example.com/a:b/c",  # no user:password@
        "AKIAIOSFODNN7EXAMPL",  # 15 characters after AKIA
        "ghp_short",
        "plain text without credentials",
    ):
        assert scrub(text) == text


def test_configured_values_are_redacted_anywhere():
    value = "correct-horse-battery"
    scrubber = Scrubber([value, "another-secret-value"])
    text = f'prefix{value}suffix and\n  {value}\n json: {{"k": "{value}"}}'
    out = scrubber.scrub(text)
    assert value not in out and out.count(REDACTED) == 3
    assert scrubber.scrub("another-secret-value") == REDACTED
    assert scrubber.scrub("correct-horse%2Dbattery") == "correct-horse%2Dbattery"  # not a form
    assert Scrubber(["p@ss word/1"]).scrub("?p=p%40ss%20word%2F1") == f"?p={REDACTED}"


def test_the_longest_value_wins():
    short, long = "abcdefgh", "abcdefgh-and-more"
    assert Scrubber([short, long]).scrub(f"<{long}>") == f"<{REDACTED}>"


def test_a_pattern_overlapping_a_value_leaves_nothing_of_it():
    value = "!tail-of-the-secret"
    token = "abcdefghijklmnopqrstu" + value  # a Bearer match would stop at '!'
    out = Scrubber([token]).scrub(f"Bearer {token}")
    assert "tail-of-the-secret" not in out


def test_short_values_are_not_scrubbed_by_value():
    short = "x" * (MIN_VALUE_LENGTH - 1)
    scrubber = Scrubber([short, "", "   "])
    assert scrubber.scrub(f"a {short} b") == f"a {short} b"
    assert Scrubber(["y" * MIN_VALUE_LENGTH]).scrub("y" * MIN_VALUE_LENGTH) == REDACTED
    # A value padded with whitespace is also matched stripped.
    assert Scrubber(["  padded-value \n"]).scrub("=padded-value=") == f"={REDACTED}="


def test_values_can_be_scrubbed_without_the_patterns():
    assert Scrubber([], patterns=False).scrub(AWS) == AWS


def test_five_megabytes_scrub_fast():
    values = [f"configured-secret-{i:02d}-{'q' * 20}" for i in range(50)]
    line = (
        "2026-01-01 INFO fetched https://example.com/api?page=2 status=200 in 12ms; "
        "see /var/log/app.log, sk- is a prefix; Bearer x; ghost; ASIA is a continent\n"
    )
    text = (line * (5_000_000 // len(line) + 1))[:5_000_000]
    middle = len(text) // 2
    text = text[:middle] + f" {values[7]} {OPENAI} password=hunter22 " + text[middle:]
    scrubber = Scrubber(values)
    started = time.perf_counter()
    out = scrubber.scrub(text)
    elapsed = time.perf_counter() - started
    print(f"\nscrubbed {len(text) / 1e6:.1f} MB in {elapsed * 1000:.0f} ms")
    assert values[7] not in out and OPENAI not in out and "hunter22" not in out
    assert out.count(REDACTED) == 3
    assert elapsed < 10  # generous: a regression to quadratic time would take minutes
