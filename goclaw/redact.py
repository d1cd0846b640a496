"""Scrub credentials out of text before a model, a log or the event log sees it.

A :class:`Scrubber` replaces with ``[REDACTED]``:

* every configured secret value (the secret store's and those of the environment
  variables the config names as ``api_key_env``) of at least :data:`MIN_VALUE_LENGTH`
  (8) characters, wherever it appears, also URL-encoded. Shorter values are not
  scrubbed by value: ``"1234"`` or ``"admin"`` would redact half of any output. Such
  a value is still caught when it has the shape of a credential (below).
* anything shaped like a credential, configured or not: OpenAI/Anthropic-style
  ``sk-...`` keys, AWS access key ids (``AKIA``/``ASIA`` + 16), GitHub tokens
  (``ghp_``, ``gho_``, ``ghu_``, ``ghs_``, ``ghr_``, ``github_pat_``), Slack tokens
  (``xoxb-``, ``xoxp-``, ``xoxa-``, ``xoxr-``, ``xoxs-``), PEM private key blocks
  (to the end of the text when the END line is missing), ``Bearer <token>`` (16+
  characters), the password in ``scheme://user:password@host``, and the value of
  ``password=``, ``passwd=``, ``pwd=``, ``secret=``, ``token=``, ``api_key=``,
  ``apikey=``, ``access_token=``, ``client_secret=`` (any case). For the last three
  kinds the label stays (``Bearer [REDACTED]``, ``user:[REDACTED]@``,
  ``password=[REDACTED]``) so the output still reads.

Values go first, in one compiled alternation, longest first (so a value containing
another is removed whole); the patterns run as a second alternation over the result,
so a pattern match that overlaps a value cannot leave part of the value behind.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
MIN_VALUE_LENGTH = 8

#: (marker, pattern): a pattern runs only when its marker is in the text. Each pattern
#: starts with a literal, so the regex engine jumps from one occurrence to the next; the
#: word boundary before it is a lookbehind. A ``keep`` group (the label) stays.
_W = r"[A-Za-z0-9_]"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "PRIVATE KEY-----",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
            r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*\Z)",
            re.DOTALL,
        ),
    ),
    ("sk-", re.compile(rf"sk-(?<!{_W}sk-)[A-Za-z0-9_\-]{{20,}}")),
    ("AKIA", re.compile(rf"AKIA(?<!{_W}AKIA)[0-9A-Z]{{16}}(?!{_W})")),
    ("ASIA", re.compile(rf"ASIA(?<!{_W}ASIA)[0-9A-Z]{{16}}(?!{_W})")),
    ("gh", re.compile(rf"gh(?<!{_W}gh)[pousr]_[A-Za-z0-9]{{36,}}")),
    ("github_pat_", re.compile(rf"github_pat_(?<!{_W}github_pat_)[A-Za-z0-9_]{{22,}}")),
    ("xox", re.compile(rf"xox(?<!{_W}xox)[abprs]-[A-Za-z0-9\-]{{10,}}")),
    (
        "earer",
        re.compile(r"(?P<keep>earer(?<=\b[Bb]earer)\s+)[A-Za-z0-9\-._~+/]{16,}=*"),
    ),
    ("://", re.compile(r"(?P<keep>://[^\s/:@]+:)[^\s/@]+(?=@)")),
    (
        "=",
        re.compile(
            r"(?P<keep>=(?i:(?<=\bpassword=)|(?<=\bpasswd=)|(?<=\bpwd=)|(?<=\bsecret=)|(?<=\btoken=)"
            r"|(?<=\bapi_key=)|(?<=\bapikey=)|(?<=\baccess_token=)|(?<=\bclient_secret=)))"
            r"[^\s&\"'<>]+"
        ),
    ),
]


def _keep_label(match: re.Match[str]) -> str:
    return match.group("keep") + REDACTED


class Scrubber:
    """``scrub(text)`` with every secret value and credential-shaped string redacted."""

    def __init__(self, values: Iterable[str] = (), *, patterns: bool = True) -> None:
        forms: set[str] = set()
        for value in values:
            if not value:
                continue
            for form in (value, value.strip(), urllib.parse.quote(value, safe="")):
                if len(form) >= MIN_VALUE_LENGTH:
                    forms.add(form)
        ordered = sorted(forms, key=lambda v: (-len(v), v))
        self._values_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._patterns = patterns

    def scrub(self, text: str) -> str:
        if self._values_re is not None:
            text = self._values_re.sub(REDACTED, text)
        if self._patterns:
            for marker, pattern in _PATTERNS:
                if marker in text:
                    keeps = "keep" in pattern.groupindex
                    text = pattern.sub(_keep_label if keeps else REDACTED, text)
        return text

    def scrub_value(self, value: Any) -> Any:
        """Every string inside a JSON-like value (a tool's result), scrubbed before it is
        encoded: in encoded JSON a credential behind an escape such as ``\\n`` no longer
        starts at a word boundary, and the patterns would miss it."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub_value(v) for v in value]
        return value

    __call__ = scrub
