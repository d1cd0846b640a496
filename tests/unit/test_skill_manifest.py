"""``SKILL.md`` parsing (every way a manifest is refused names the file and the key) and
discovery: the three places, their precedence, and whether an instruction skill can run here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from goclaw.config import SkillSettings
from goclaw.skills.discovery import (
    BUNDLED_DIR,
    INSTALLED,
    PROJECT,
    USER,
    KnownTools,
    Source,
    discover,
    missing_requirements,
    skill_sources,
)
from goclaw.skills.manifest import (
    Limits,
    ManifestError,
    Requirements,
    parse_manifest,
    read_manifest,
)
from tests.skill_support import make_config, manifest_text, ok_wat, write_instructions, write_skill

SETTINGS = SkillSettings()
WASM = {"abi": 1, "module": "m.wasm"}


def parse(tmp_path: Path, name: str = "sample", settings=SETTINGS, **fields):
    return parse_manifest(manifest_text(name, **fields), tmp_path, settings)


def refused(tmp_path: Path, text: str, settings=SETTINGS) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, tmp_path, settings)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "SKILL.md")), message
    return message


def refused_fields(tmp_path: Path, name: str = "sample", settings=SETTINGS, **fields) -> str:
    return refused(tmp_path, manifest_text(name, **fields), settings)


# -- what loads -------------------------------------------------------------------


def test_a_wasm_manifest_loads_with_every_field(tmp_path):
    manifest = parse(
        tmp_path,
        "text_stats",
        description="Count  the bytes\n of a text.",
        abi=1,
        module="text_stats.wasm",
        source="text_stats.wat",
        input={"type": "object", "properties": {"text": {"type": "string"}}},
        capabilities=["kv", "http"],
        limits={"fuel": 1000, "memory_bytes": 65536, "timeout_seconds": 1},
        examples=[{"input": {"text": "a"}, "output": {"bytes": 1}}, {"input": {}}],
        body="# Text stats\n\nDocs.",
    )
    assert manifest.is_wasm
    assert manifest.name == "text_stats"
    assert manifest.description == "Count the bytes of a text."
    assert manifest.folder == tmp_path.resolve()
    assert manifest.module == tmp_path.resolve() / "text_stats.wasm"
    assert manifest.source == tmp_path.resolve() / "text_stats.wat"
    assert manifest.capabilities == frozenset({"kv", "http"})
    assert manifest.limits == Limits(fuel=1000, memory_bytes=65536, timeout_seconds=1.0)
    assert isinstance(manifest.limits.timeout_seconds, float)
    assert [e.output for e in manifest.examples] == [{"bytes": 1}, None]
    assert manifest.body == "# Text stats\n\nDocs."
    assert manifest.path == tmp_path.resolve() / "SKILL.md"


def test_limits_default_to_the_config(tmp_path):
    settings = SkillSettings(fuel=123, memory_bytes=65536 * 2, timeout_seconds=0.5)
    manifest = parse(tmp_path, settings=settings, **WASM)
    assert manifest.limits == Limits(fuel=123, memory_bytes=131072, timeout_seconds=0.5)
    assert manifest.input_schema == {"type": "object"}
    assert manifest.capabilities == frozenset()


def test_an_instruction_manifest_loads(tmp_path):
    manifest = parse(tmp_path, "deploy", body="Step one.", requires={"bins": ["git"]})
    assert not manifest.is_wasm
    assert manifest.module is None and manifest.limits is None
    assert manifest.body == "Step one."
    assert manifest.requires == Requirements(bins=("git",))


def test_crlf_front_matter_loads(tmp_path):
    text = "---\r\nname: crlf\r\ndescription: Windows line ends.\r\n---\r\nBody.\r\n"
    assert parse_manifest(text, tmp_path, SETTINGS).name == "crlf"


def test_read_manifest_reads_the_folders_skill_md(tmp_path):
    write_instructions(tmp_path / "one", "one", "Body.")
    assert read_manifest(tmp_path / "one", SETTINGS).body == "Body."
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "none", SETTINGS)
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "SKILL.md").write_bytes(b"---\nname: caf\xe9\n---\n")
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "latin", SETTINGS)


# -- what does not ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["name: x\ndescription: y\n", "\n---\nname: x\ndescription: y\n---\n", "---\nname: x\n"],
    ids=["no-dashes", "blank-line-first", "never-closed"],
)
def test_missing_front_matter(tmp_path, text):
    assert "no front matter" in refused(tmp_path, text)


def test_front_matter_that_is_not_yaml_or_not_a_mapping(tmp_path):
    assert "not valid YAML" in refused(tmp_path, "---\nname: [x\n---\n")
    assert "must be a mapping" in refused(tmp_path, "---\n- name\n- x\n---\n")
    assert "must be a mapping" in refused(tmp_path, "---\n---\nBody.\n")


@pytest.mark.parametrize(
    "name",
    ["Bad", "1abc", "a-b", "a b", "_a", "é", "a" * 65, "", 7, None, ["a"]],
    ids=lambda name: repr(name)[:12],
)
def test_a_bad_name(tmp_path, name):
    text = manifest_text("placeholder").replace("name: placeholder", f"name: {name!r}")
    if name is None:
        text = text.replace("name: None\n", "")
    message = refused(tmp_path, text)
    assert ": name: " in message


def test_a_name_may_have_64_characters(tmp_path):
    assert parse(tmp_path, "a" * 64).name == "a" * 64


def test_a_name_with_a_trailing_newline_is_refused(tmp_path):
    # NAME uses `$`, which also matches before a final "\n": "bad\n" would become a tool
    # name (and the audit capability "skills.bad\n").
    text = '---\nname: "bad\\n"\ndescription: A name with a newline.\n---\n'
    assert ": name: " in refused(tmp_path, text)


def test_an_unknown_key(tmp_path):
    message = refused_fields(tmp_path, **WASM, version=3)
    assert ": version: unknown key" in message


@pytest.mark.parametrize("description", [None, "", "   ", 5, "x" * 1025])
def test_a_bad_description(tmp_path, description):
    assert ": description: " in refused_fields(tmp_path, description=description or "")
    if description is None:
        text = manifest_text("sample").replace("description: The sample test skill.\n", "")
        assert ": description: required" in refused(tmp_path, text)


@pytest.mark.parametrize("abi", [2, 0, "1", None])
def test_an_abi_other_than_1(tmp_path, abi):
    message = refused_fields(tmp_path, module="m.wasm", abi=abi)
    assert ": abi: this goclaw speaks skill ABI 1" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("fuel", 1_000_000_001), ("memory_bytes", 256 * 1024 * 1024 + 1), ("timeout_seconds", 30.5)],
)
def test_limits_above_the_ceiling_name_the_setting(tmp_path, key, value):
    message = refused_fields(tmp_path, **WASM, limits={key: value})
    assert f": limits.{key}: " in message
    assert f"skills.max_{key}" in message


def test_the_ceiling_comes_from_the_config(tmp_path):
    settings = SkillSettings(fuel=10, max_fuel=1000)
    assert parse(tmp_path, settings=settings, **WASM, limits={"fuel": 1000}).limits.fuel == 1000
    message = refused_fields(tmp_path, settings=settings, **WASM, limits={"fuel": 1001})
    assert "above the ceiling 1000 (config skills.max_fuel)" in message


@pytest.mark.parametrize(
    ("limits", "key", "why"),
    [
        ({"fuel": 0}, "limits.fuel", "positive"),
        ({"fuel": -5}, "limits.fuel", "positive"),
        ({"fuel": 1.5}, "limits.fuel", "whole number"),
        ({"fuel": "lots"}, "limits.fuel", "positive"),
        ({"fuel": True}, "limits.fuel", "positive"),
        ({"timeout_seconds": 0}, "limits.timeout_seconds", "positive"),
        ({"stack": 1}, "limits.stack", "unknown limit"),
        ([1], "limits", "mapping"),
    ],
)
def test_bad_limits(tmp_path, limits, key, why):
    message = refused_fields(tmp_path, **WASM, limits=limits)
    assert f": {key}: " in message and why in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fuel", float("nan")),
        ("fuel", float("inf")),
        ("memory_bytes", float("nan")),
        ("timeout_seconds", float("nan")),
        ("timeout_seconds", float("inf")),
    ],
    ids=["fuel-nan", "fuel-inf", "memory-nan", "timeout-nan", "timeout-inf"],
)
def test_limits_that_are_not_finite_numbers(tmp_path, key, value):
    # YAML has .nan and .inf. A NaN passes both "<= 0" and "> ceiling" unnoticed, and
    # int(NaN) / int(inf) raise ValueError / OverflowError: each must be a ManifestError.
    message = refused_fields(tmp_path, **WASM, limits={key: value})
    assert f": limits.{key}: " in message


def test_an_example_must_match_the_input_schema(tmp_path):
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False,
    }
    message = refused_fields(tmp_path, **WASM, input=schema, examples=[{"input": {"text": 3}}])
    assert ": examples[0].input: does not match input" in message
    message = refused_fields(
        tmp_path, **WASM, input=schema, examples=[{"input": {"text": "a"}}, {"input": {}}]
    )
    assert ": examples[1].input: does not match input" in message
    assert "text" in message


@pytest.mark.parametrize(
    ("examples", "key"),
    [
        ({"input": {}}, "examples"),
        ([{"input": {}, "expect": 1}], "examples[0]"),
        (["x"], "examples[0]"),
        ([{"input": [1]}], "examples[0].input"),
        ([{"output": 1}], "examples[0].input"),
    ],
)
def test_bad_examples(tmp_path, examples, key):
    assert f": {key}: " in refused_fields(tmp_path, **WASM, examples=examples)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "array"}, "type object"),
        ("object", "type object"),
        ({"type": "object", "properties": 5}, "not a valid JSON Schema"),
        ({"type": "object", "required": "text"}, "not a valid JSON Schema"),
    ],
)
def test_a_bad_input_schema(tmp_path, schema, why):
    message = refused_fields(tmp_path, **WASM, input=schema)
    assert ": input: " in message and why in message


def test_an_unresolvable_ref_in_the_input_schema_is_a_manifest_error(tmp_path):
    # The examples are validated against the schema; a $ref to nothing must be the
    # manifest's fault (ManifestError), not an exception that stops discovery.
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    message = refused_fields(tmp_path, **WASM, input=schema, examples=[{"input": {"a": 1}}])
    assert ": input" in message or ": examples[0]" in message


@pytest.mark.parametrize(
    ("capabilities", "why"),
    [(["fs"], "unknown capability 'fs'"), ("http", "list of names"), ([1], "list of names")],
)
def test_bad_capabilities(tmp_path, capabilities, why):
    message = refused_fields(tmp_path, **WASM, capabilities=capabilities)
    assert ": capabilities: " in message and why in message


@pytest.mark.parametrize("module", ["../elsewhere.wasm", "/etc/passwd", "", 5])
def test_a_module_outside_the_folder_or_not_a_name(tmp_path, module):
    assert ": module: " in refused_fields(tmp_path, abi=1, module=module)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("abi", 1),
        ("source", "x.wat"),
        ("input", {"type": "object"}),
        ("capabilities", ["http"]),
        ("limits", {"fuel": 5}),
        ("examples", [{"input": {}}]),
    ],
)
def test_an_instruction_skill_with_a_wasm_only_key(tmp_path, key, value):
    message = refused_fields(tmp_path, **{key: value})
    assert f": {key}: only a WASM skill" in message


def test_requires_is_parsed(tmp_path):
    manifest = parse(
        tmp_path, requires={"bins": "git", "env": ["A_TOKEN", "B"], "os": ["linux", "darwin"]}
    )
    assert manifest.requires == Requirements(
        bins=("git",), env=("A_TOKEN", "B"), os=("linux", "darwin")
    )
    assert parse(tmp_path).requires == Requirements()
    assert parse(tmp_path, **WASM, requires={"env": ["X"]}).requires.env == ("X",)


@pytest.mark.parametrize(
    ("requires", "key"),
    [
        ({"gpu": ["cuda"]}, "requires.gpu"),
        ({"bins": [""]}, "requires.bins"),
        ({"bins": [3]}, "requires.bins"),
        ({"env": {"A": 1}}, "requires.env"),
        (["git"], "requires"),
    ],
)
def test_bad_requires(tmp_path, requires, key):
    assert f": {key}: " in refused_fields(tmp_path, requires=requires)


# -- discovery --------------------------------------------------------------------


@pytest.fixture
def places(tmp_path):
    places = {label: tmp_path / label for label in (PROJECT, USER, INSTALLED)}
    for path in places.values():
        path.mkdir()
    return places


def sources(places) -> list[Source]:
    return [Source(label, places[label]) for label in (PROJECT, USER, INSTALLED)]


def test_precedence_is_project_then_user_then_installed(places):
    for label in (PROJECT, USER, INSTALLED):
        write_instructions(places[label] / "same", "same", f"from {label}")
    write_instructions(places[USER] / "mine", "mine", "user only")
    write_instructions(places[INSTALLED] / "mine", "mine", "installed")
    write_instructions(places[INSTALLED] / "shipped", "shipped", "installed only")
    found = discover(sources(places), SETTINGS).skills
    assert {name: f.source for name, f in found.items()} == {
        "same": PROJECT,
        "mine": USER,
        "shipped": INSTALLED,
    }
    assert found["same"].manifest.body == f"from {PROJECT}"
    assert [p.parent.name for p in found["same"].shadows] == [USER, INSTALLED]
    assert [p.parent.name for p in found["mine"].shadows] == [INSTALLED]
    assert found["shipped"].shadows == ()


def test_the_name_in_skill_md_decides_not_the_folder(places):
    write_instructions(places[PROJECT] / "folder_a", "same", "project")
    write_instructions(places[USER] / "folder_b", "same", "user")
    found = discover(sources(places), SETTINGS).skills
    assert found["same"].source == PROJECT
    assert [p.name for p in found["same"].shadows] == ["folder_b"]


def test_a_broken_skill_is_a_problem_and_the_rest_load(places, tmp_path):
    write_instructions(places[PROJECT] / "fine", "fine", "ok")
    broken = places[USER] / "broken"
    broken.mkdir()
    (broken / "SKILL.md").write_text("no front matter here")
    (places[USER] / "not_a_skill").mkdir()  # no SKILL.md: not a skill at all
    (places[USER] / "stray.txt").write_text("x")
    missing = Source(USER, tmp_path / "does-not-exist")
    discovery = discover([*sources(places), missing], SETTINGS)
    assert set(discovery.skills) == {"fine"}
    ((folder, why),) = discovery.problems
    assert folder == broken.resolve()
    assert "no front matter" in why


def test_skill_sources_follow_the_config(tmp_path):
    config = make_config(tmp_path / "home", user_dir=str(tmp_path / "u"), bundled_dir="")
    assert [(s.label, s.path) for s in skill_sources(config)] == [
        (PROJECT, tmp_path / "home" / "skills"),
        (USER, tmp_path / "u"),
        (INSTALLED, BUNDLED_DIR),
    ]
    assert Path(__file__).resolve().parents[2] / "skills" == BUNDLED_DIR


def test_known_tools_list_wasm_skills_not_instruction_skills(tmp_path):
    config = make_config(tmp_path / "home")
    write_skill(tmp_path / "home" / "skills" / "counter", "counter", ok_wat(1))
    write_instructions(tmp_path / "home" / "skills" / "howto", "howto", "text")
    known = KnownTools(config)
    assert "counter" in known
    assert "howto" not in known
    assert {"read_file", "web_fetch", "skill_read", "skill_search"} <= set(known)
    assert len(known) == len(list(known))


def requiring(tmp_path, **requires):
    return parse(tmp_path, requires=requires)


def test_an_eligible_skill_misses_nothing(tmp_path):
    manifest = requiring(tmp_path, bins=["git"], env=["TOKEN"], os=["linux", "darwin"])
    missing = missing_requirements(
        manifest, {"TOKEN": "t"}, which=lambda name: f"/usr/bin/{name}", platform="linux"
    )
    assert missing == []
    assert missing_requirements(parse(tmp_path), {}, which=lambda name: None) == []


def test_missing_bins_env_and_os_are_named(tmp_path):
    manifest = requiring(tmp_path, bins=["git", "gh"], env=["TOKEN", "EMPTY"], os=["darwin"])
    on_path = {"git"}
    missing = missing_requirements(
        manifest,
        {"EMPTY": ""},  # set but empty counts as missing
        which=lambda name: f"/bin/{name}" if name in on_path else None,
        platform="linux",
    )
    assert missing == [
        "the program 'gh' on PATH",
        "the environment variable TOKEN",
        "the environment variable EMPTY",
        "one of the systems darwin (this is linux)",
    ]


@pytest.mark.parametrize(
    ("platform", "eligible"),
    [("linux", True), ("darwin", True), ("win32", False), ("freebsd14", False)],
)
def test_os_is_a_platform_prefix(tmp_path, platform, eligible):
    manifest = requiring(tmp_path, os=["linux", "darwin"])
    missing = missing_requirements(manifest, {}, which=lambda name: None, platform=platform)
    assert (missing == []) is eligible


def test_missing_requirements_read_the_process_environment_by_default(tmp_path, monkeypatch):
    manifest = requiring(tmp_path, env=["GOCLAW_TEST_SKILL_TOKEN"])
    monkeypatch.delenv("GOCLAW_TEST_SKILL_TOKEN", raising=False)
    assert missing_requirements(manifest) == ["the environment variable GOCLAW_TEST_SKILL_TOKEN"]
    monkeypatch.setenv("GOCLAW_TEST_SKILL_TOKEN", "x")
    assert missing_requirements(manifest) == []
