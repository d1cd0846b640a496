"""``SKILL.md``: a skill's front matter, checked into an immutable ``Manifest``.

One parser for both kinds of skill. A manifest that names a ``module`` is a
WASM skill (a tool); one without is an instruction skill (text an agent reads
on demand). Everything a load could trip over later (the schema, the limits,
the examples) is checked here, so a broken skill fails when it is read, with
``SKILL.md: key: why``, not when a model first calls it.

The format is documented in ``docs/skills.md``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import referencing.exceptions
import yaml

from goclaw.config import SkillSettings
from goclaw.errors import ConfigError

MANIFEST_FILE = "SKILL.md"
ABI_VERSION = 1
#: A skill's name is the tool name agents list, so it follows config's tool names.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CAPABILITIES = frozenset({"http", "kv"})
REQUIREMENTS = ("bins", "env", "os")
_DESCRIPTION_CHARS = 1024
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$\n?(.*)\Z", re.S | re.M)
_KEYS = (
    "name",
    "description",
    "abi",
    "module",
    "source",
    "input",
    "capabilities",
    "limits",
    "examples",
    "requires",
    "metadata",
    "license",
)
_WASM_ONLY = ("abi", "source", "input", "capabilities", "limits", "examples")


class ManifestError(ConfigError):
    """A ``SKILL.md`` that cannot be loaded; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one invocation may use; always within the config's ceilings."""

    fuel: int
    memory_bytes: int
    timeout_seconds: float


@dataclasses.dataclass(frozen=True)
class Example:
    input: Mapping[str, Any]
    #: None: any ``ok`` output passes.
    output: Any = None


@dataclasses.dataclass(frozen=True)
class Requirements:
    bins: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    os: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    #: The folder the skill lives in (absolute).
    folder: Path
    #: The Markdown after the front matter: the text an agent loads on use.
    body: str
    #: The WASM module's path, or None for an instruction skill.
    module: Path | None = None
    source: Path | None = None
    #: JSON Schema of the tool's arguments (WASM skills).
    input_schema: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    capabilities: frozenset[str] = frozenset()
    limits: Limits | None = None
    examples: tuple[Example, ...] = ()
    requires: Requirements = Requirements()

    @property
    def is_wasm(self) -> bool:
        return self.module is not None

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_FILE


def read_manifest(folder: Path, settings: SkillSettings) -> Manifest:
    """Read ``folder/SKILL.md``; raise ``ManifestError`` naming what is wrong and where."""
    folder = Path(folder).resolve()
    path = folder / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    return parse_manifest(text, folder, settings)


def parse_manifest(text: str, folder: Path, settings: SkillSettings) -> Manifest:
    where = str(folder / MANIFEST_FILE)
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ManifestError(f"{where}: no front matter: the file must start with a '---' line")
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: front matter is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: front matter must be a mapping of keys")
    return _Reader(where, folder, data, settings).read(match.group(2))


class _Reader:
    def __init__(
        self, where: str, folder: Path, data: dict[str, Any], settings: SkillSettings
    ) -> None:
        self.where = where
        self.folder = folder
        self.data = data
        self.settings = settings

    def fail(self, key: str, why: str) -> ManifestError:
        return ManifestError(f"{self.where}: {key}: {why}")

    def read(self, body: str) -> Manifest:
        unknown = sorted(set(self.data) - set(_KEYS), key=str)
        if unknown:
            raise self.fail(str(unknown[0]), f"unknown key (known: {', '.join(_KEYS)})")
        name = self.data.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise self.fail(
                "name", f"{name!r} must match {NAME.pattern} (it is the tool name agents list)"
            )
        description = self.data.get("description")
        if not isinstance(description, str) or not description.strip():
            raise self.fail("description", "required: one line saying what the skill does")
        if len(description) > _DESCRIPTION_CHARS:
            raise self.fail("description", f"longer than {_DESCRIPTION_CHARS} characters")
        fields: dict[str, Any] = {
            "name": name,
            "description": " ".join(description.split()),
            "folder": self.folder,
            "body": body.strip(),
            "requires": self._requires(),
        }
        if "module" not in self.data:
            stray = [key for key in _WASM_ONLY if key in self.data]
            if stray:
                raise self.fail(stray[0], "only a WASM skill (one with a 'module') has this key")
            return Manifest(**fields)
        abi = self.data.get("abi")
        if type(abi) is not int or abi != ABI_VERSION:
            raise self.fail(
                "abi", f"this goclaw speaks skill ABI {ABI_VERSION}, got {self.data.get('abi')!r}"
            )
        schema = self._input_schema()
        return Manifest(
            **fields,
            module=self._file("module"),
            source=self._file("source") if "source" in self.data else None,
            input_schema=types.MappingProxyType(schema),
            capabilities=self._capabilities(),
            limits=self._limits(),
            examples=self._examples(schema),
        )

    def _file(self, key: str) -> Path:
        raw = self.data.get(key)
        if not isinstance(raw, str) or not raw:
            raise self.fail(key, "must be a file name relative to the skill's folder")
        path = (self.folder / raw).resolve()
        if not path.is_relative_to(self.folder):
            raise self.fail(key, f"{raw!r} is outside the skill's folder")
        return path

    def _input_schema(self) -> dict[str, Any]:
        schema = self.data.get("input", {"type": "object"})
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise self.fail("input", "must be a JSON Schema of type object")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise self.fail("input", f"not a valid JSON Schema: {exc.message}") from None
        return schema

    def _capabilities(self) -> frozenset[str]:
        raw = self.data.get("capabilities") or []
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise self.fail("capabilities", "must be a list of names")
        for capability in raw:
            if capability not in CAPABILITIES:
                known = ", ".join(sorted(CAPABILITIES))
                raise self.fail("capabilities", f"unknown capability {capability!r} ({known})")
        return frozenset(raw)

    def _limits(self) -> Limits:
        raw = self.data.get("limits") or {}
        if not isinstance(raw, dict):
            raise self.fail("limits", "must be a mapping")
        settings = self.settings
        values: dict[str, Any] = {}
        for key, kind in (("fuel", int), ("memory_bytes", int), ("timeout_seconds", float)):
            default, ceiling = getattr(settings, key), getattr(settings, f"max_{key}")
            value = raw.pop(key, default)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise self.fail(f"limits.{key}", f"must be a positive number, got {value!r}")
            if kind is int and value != int(value):
                raise self.fail(f"limits.{key}", f"must be a whole number, got {value!r}")
            if value > ceiling:
                raise self.fail(
                    f"limits.{key}",
                    f"{value} is above the ceiling {ceiling} (config skills.max_{key})",
                )
            values[key] = kind(value)
        if raw:
            raise self.fail(f"limits.{next(iter(raw))}", "unknown limit")
        return Limits(**values)

    def _examples(self, schema: dict[str, Any]) -> tuple[Example, ...]:
        raw = self.data.get("examples") or []
        if not isinstance(raw, list):
            raise self.fail("examples", "must be a list of {input, output}")
        validator = jsonschema.Draft202012Validator(schema)
        examples = []
        for index, entry in enumerate(raw):
            key = f"examples[{index}]"
            if not isinstance(entry, dict) or set(entry) - {"input", "output"}:
                raise self.fail(key, "must be a mapping with 'input' and optional 'output'")
            given = entry.get("input")
            if not isinstance(given, dict):
                raise self.fail(f"{key}.input", "must be a mapping (the tool's arguments)")
            try:
                error = jsonschema.exceptions.best_match(validator.iter_errors(given))
            except referencing.exceptions.Unresolvable:  # a $ref that points nowhere
                raise self.fail("input", "a $ref in the schema cannot be resolved") from None
            if error is not None:
                raise self.fail(f"{key}.input", f"does not match input: {error.message}")
            examples.append(Example(input=given, output=entry.get("output")))
        return tuple(examples)

    def _requires(self) -> Requirements:
        raw = self.data.get("requires") or {}
        if not isinstance(raw, dict):
            raise self.fail("requires", f"must be a mapping of {', '.join(REQUIREMENTS)}")
        values = {}
        for key, value in raw.items():
            if key not in REQUIREMENTS:
                raise self.fail(f"requires.{key}", f"unknown (known: {', '.join(REQUIREMENTS)})")
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise self.fail(f"requires.{key}", "must be a list of names")
            values[key] = tuple(value)
        return Requirements(**values)
