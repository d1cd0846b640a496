"""The skill registry as a worker uses it: the key-value store and the quarantine in the
database (SQLite and PostgreSQL), hot reload in three phases, the compile cache, instruction
skills (read, search, the prompt), and the bundled skills built from their sources.
"""

from __future__ import annotations

import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import wasmtime

from goclaw.agent.tools import ToolError
from goclaw.audit import AuditLog
from goclaw.config import SkillSettings
from goclaw.skills import registry as registry_module
from goclaw.skills.manifest import read_manifest
from goclaw.skills.quarantine import SkillHealth
from goclaw.skills.registry import CACHE_DIR, PROMPT_SKILLS
from goclaw.store.kv import KeyValue
from tests.skill_support import (
    KV_INPUT,
    audit_records,
    flaky_wat,
    json_server,
    kv_wat,
    make_config,
    make_registry,
    manifest_text,
    ok_wat,
    open_db,
    replace_file,
    skill_wat,
    write_instructions,
    write_skill,
)
from tests.tool_context import LOOPBACK, make_ctx

BUNDLED = Path(__file__).resolve().parents[2] / "skills"
BUNDLED_NAMES = ("tally", "text_stats", "url_check")
MODE_INPUT = {
    "type": "object",
    "properties": {"mode": {"enum": ["ok", "loop"]}},
    "required": ["mode"],
}


@pytest.fixture
def sqlite_db(sqlite_url):
    database = open_db(sqlite_url)
    yield database
    database.close()


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def ctx(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return make_ctx(workspace)


def failure(registry, name, ctx, arguments=None) -> ToolError:
    with pytest.raises(ToolError) as caught:
        registry.invoke(name, ctx, arguments or {})
    return caught.value


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- kv ---------------------------------------------------------------------------


def test_kv_round_trip_persists_across_registries_in_separate_key_spaces(home, db, tmp_path, ctx):
    config = make_config(home)
    # The self-test runs "set" in a scratch store: the database must not see it.
    examples = [{"input": {"op": "set"}, "output": 0}]
    for name, value in (("kv_a", '"A"'), ("kv_b", '"B"')):
        write_skill(
            home / "skills" / name,
            name,
            kv_wat(value),
            capabilities=["kv"],
            input=KV_INPUT,
            examples=examples,
        )
    audit = AuditLog(db, tmp_path / "audit.jsonl")
    first = make_registry(config, db, audit)
    assert first.current().wasm["kv_a"].rejection is None
    assert KeyValue(db, "skill:kv_a").get("k") is None

    assert first.invoke("kv_a", ctx, {"op": "get"}) is None
    assert first.invoke("kv_a", ctx, {"op": "set"}) == 0
    assert first.invoke("kv_a", ctx, {"op": "get"}) == "A"
    assert first.invoke("kv_b", ctx, {"op": "get"}) is None  # a key space of its own
    assert first.invoke("kv_b", ctx, {"op": "set"}) == 0
    assert first.invoke("kv_a", ctx, {"op": "get"}) == "A"

    second = make_registry(config, db, audit)  # a restarted worker
    assert second.invoke("kv_a", ctx, {"op": "get"}) == "A"
    assert second.invoke("kv_b", ctx, {"op": "get"}) == "B"
    assert second.invoke("kv_a", ctx, {"op": "delete"}) == 0
    assert second.invoke("kv_a", ctx, {"op": "delete"}) == 1
    assert second.invoke("kv_a", ctx, {"op": "get"}) is None
    assert second.invoke("kv_b", ctx, {"op": "get"}) == "B"
    assert KeyValue(db, "skill:kv_b").items() == {"k": b'"B"'}


def test_kv_refuses_long_keys_big_values_and_the_thousand_and_first_key(home, sqlite_db, ctx):
    config = make_config(home)
    skills = {
        "long_key": kv_wat('"v"', key="k" * 257),
        "big_value": kv_wat('"' + "x" * (64 * 1024 - 1) + '"'),  # 64 KiB + 1
        "just_fits": kv_wat('"' + "x" * (64 * 1024 - 2) + '"'),  # 64 KiB
        "crowded": kv_wat('"v"'),
    }
    for name, wat in skills.items():
        write_skill(home / "skills" / name, name, wat, capabilities=["kv"], input=KV_INPUT)
    registry = make_registry(config, sqlite_db)
    assert registry.invoke("long_key", ctx, {"op": "set"}) == 1
    assert registry.invoke("long_key", ctx, {"op": "get"}) is None
    assert registry.invoke("big_value", ctx, {"op": "set"}) == 1
    assert registry.invoke("just_fits", ctx, {"op": "set"}) == 0
    store = KeyValue(sqlite_db, "skill:crowded")
    for index in range(1000):
        store.put(f"key{index}", b"1")
    assert registry.invoke("crowded", ctx, {"op": "set"}) == 2
    store.put("k", b'"old"')  # replacing a key it holds is not a new key
    assert registry.invoke("crowded", ctx, {"op": "set"}) == 0
    assert registry.invoke("crowded", ctx, {"op": "get"}) == "v"


# -- quarantine -------------------------------------------------------------------


def test_faults_quarantine_a_skill_across_restarts_until_enabled(home, db, tmp_path, ctx):
    config = make_config(home, quarantine_faults=3)
    write_skill(
        home / "skills" / "flaky", "flaky", flaky_wat(), input=MODE_INPUT, limits={"fuel": 100_000}
    )
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    audit = AuditLog(db, tmp_path / "audit.jsonl")
    registry = make_registry(config, db, audit)
    assert registry.invoke("flaky", ctx, {"mode": "ok"}) == "fine"

    for _ in range(3):
        error = failure(registry, "flaky", ctx, {"mode": "loop"})
        assert error.code == "skill_out_of_fuel"
    assert "quarantined the skill" in error.message
    assert "goclaw skill enable flaky" in error.message

    error = failure(registry, "flaky", ctx, {"mode": "ok"})  # even a call that would work
    assert error.code == "skill_quarantined"
    assert "3 faults" in error.message
    assert registry.invoke("good", ctx, {}) == "fine"  # the other skills go on

    restarted = make_registry(config, db, audit)
    assert failure(restarted, "flaky", ctx, {"mode": "ok"}).code == "skill_quarantined"

    health = SkillHealth(db, audit, config.skills)
    assert set(health.quarantined()) == {"flaky"}
    lifted = health.enable("flaky", by="test")
    assert lifted is not None and "skill_out_of_fuel" in lifted.reason
    assert health.enable("flaky", by="test") is None  # nothing left to lift
    assert restarted.invoke("flaky", ctx, {"mode": "ok"}) == "fine"

    # The three faults before the enable no longer count: two more do not quarantine...
    for _ in range(2):
        assert failure(restarted, "flaky", ctx, {"mode": "loop"}).code == "skill_out_of_fuel"
    assert restarted.invoke("flaky", ctx, {"mode": "ok"}) == "fine"
    assert health.quarantine_of("flaky") is None
    # ...and a third does.
    failure(restarted, "flaky", ctx, {"mode": "loop"})
    assert failure(restarted, "flaky", ctx, {"mode": "ok"}).code == "skill_quarantined"

    assert [f.code for f in health.faults("flaky")] == ["skill_out_of_fuel"] * 6
    faults = audit_records(audit, capability="skills.flaky", decision="fault")
    assert len(faults) == 6
    assert all(r.reason.startswith("skill_out_of_fuel: ") for r in faults)
    assert all(r.agent == "tester" and r.task_id == 1 and r.session == "s" for r in faults)
    quarantines = audit_records(audit, capability="skills.flaky", decision="quarantine")
    assert len(quarantines) == 2
    assert "3 faults" in quarantines[0].reason
    (enabled,) = audit_records(audit, capability="skills.flaky", decision="enable")
    assert "test" in enabled.reason
    assert audit.verify().ok


def test_faults_outside_the_window_do_not_count(home, sqlite_db, tmp_path):
    settings = SkillSettings(quarantine_faults=2, quarantine_window_seconds=60)
    now = [1000.0]
    health = SkillHealth(sqlite_db, None, settings, clock=lambda: now[0])
    fault = {"agent": "a", "task_id": None, "session": None, "policy_version": "-"}
    assert health.record_fault("s", "skill_trap", "one", **fault) is None
    now[0] += 61
    assert health.record_fault("s", "skill_trap", "two", **fault) is None
    now[0] += 1
    quarantine = health.record_fault("s", "skill_trap", "three", **fault)
    assert quarantine is not None and quarantine.since == now[0]
    assert "2 faults within 60 s" in quarantine.reason


# -- hot reload -------------------------------------------------------------------


def hot_skill(home: Path, wat, answer: str = "v1") -> Path:
    return write_skill(
        home / "skills" / "hot",
        "hot",
        wat,
        examples=[{"input": {}, "output": answer}],
    )


def rejections(audit, name="hot"):
    return audit_records(audit, capability="skills.reload", decision="reject", subject=name)


@pytest.fixture
def audit(sqlite_db, tmp_path):
    return AuditLog(sqlite_db, tmp_path / "audit.jsonl")


def test_hot_reload_keeps_v1_through_a_failed_self_test_then_takes_v2(home, sqlite_db, audit, ctx):
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    registry = make_registry(config, sqlite_db, audit)
    assert registry.invoke("hot", ctx, {}) == "v1"

    answers: list[object] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                answers.append(registry.invoke("hot", ctx, {}))
            except Exception as exc:
                answers.append(exc)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        wait_for(lambda: len(answers) >= 5)
        hot_skill(home, skill_wat("unreachable"))  # passes compile and instantiate, not the test
        registry.reload()
        settled = len(answers)
        wait_for(lambda: len(answers) >= settled + 20)
    finally:
        stop.set()
        caller.join()
    assert set(map(repr, answers)) == {"'v1'"}

    skill = registry.current().wasm["hot"]
    assert skill.live is not None
    assert skill.rejection.startswith("self-test examples[0]: skill_trap"), skill.rejection
    records = rejections(audit)
    assert records, "the rejected reload is audited"
    assert all(r.reason.startswith("self-test examples[0] failed: skill_trap") for r in records)
    assert registry.health.faults("hot") == []  # a rejected version is not the live one faulting

    hot_skill(home, ok_wat("v2"), answer="v2")
    snapshot = registry.reload()
    assert snapshot.wasm["hot"].rejection is None
    assert registry.invoke("hot", ctx, {}) == "v2"
    assert registry.invoke("hot", ctx, {}) == "v2"
    assert folder.exists()


def test_a_new_version_answering_something_else_than_its_example_is_rejected(
    home, sqlite_db, audit, ctx
):
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    registry = make_registry(config, sqlite_db, audit)
    replace_file(folder / "hot.wasm", bytes(wasmtime.wat2wasm(ok_wat("v2"))))  # example says v1
    skill = registry.reload().wasm["hot"]
    assert skill.rejection.startswith("self-test examples[0]: skill_bad_output"), skill.rejection
    assert '"v2"' in skill.rejection and '"v1"' in skill.rejection
    assert registry.invoke("hot", ctx, {}) == "v1"
    # The rejected version is not staged again on every check, only when it changes.
    registry.reload()
    assert len(rejections(audit)) == 1


def test_a_module_that_does_not_compile_keeps_the_live_version(home, sqlite_db, audit, ctx):
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    registry = make_registry(config, sqlite_db, audit)
    replace_file(folder / "hot.wasm", b"\x00asm\x01\x00\x00\x00 this is garbage")
    skill = registry.reload().wasm["hot"]
    assert skill.live is not None
    assert skill.rejection.startswith("compile: skill_abi_mismatch"), skill.rejection
    assert registry.invoke("hot", ctx, {}) == "v1"
    (record,) = rejections(audit)
    assert record.reason.startswith("compile failed: skill_abi_mismatch")


def test_a_skill_md_edited_into_invalid_yaml_keeps_the_live_version(home, sqlite_db, audit, ctx):
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    registry = make_registry(config, sqlite_db, audit)
    replace_file(folder / "SKILL.md", "---\nname: hot\ndescription: [not closed\n---\n")
    snapshot = registry.reload()
    assert registry.invoke("hot", ctx, {}) == "v1"
    assert [folder.resolve()] == [where for where, _ in snapshot.problems]
    assert "not valid YAML" in snapshot.wasm["hot"].rejection
    (record,) = rejections(audit)
    assert record.reason.startswith("manifest failed")
    registry.reload()  # nothing changed: not audited again
    assert len(rejections(audit)) == 1


def test_fixing_the_skill_md_again_clears_the_rejection(home, sqlite_db, audit, ctx):
    # WasmSkill.rejection: "why the newest one was rejected". Once the SKILL.md is what it
    # was, the newest version is the live one, and `goclaw skill list` should not go on
    # saying the manifest is broken.
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    original = (folder / "SKILL.md").read_text()
    registry = make_registry(config, sqlite_db, audit)
    replace_file(folder / "SKILL.md", "---\nname: hot\ndescription: [not closed\n---\n")
    assert registry.reload().wasm["hot"].rejection is not None
    replace_file(folder / "SKILL.md", original)
    snapshot = registry.reload()
    assert snapshot.problems == ()
    assert registry.invoke("hot", ctx, {}) == "v1"
    assert snapshot.wasm["hot"].rejection is None


def test_a_skill_whose_folder_is_removed_is_gone(home, sqlite_db, audit, ctx):
    config = make_config(home)
    folder = hot_skill(home, ok_wat("v1"))
    registry = make_registry(config, sqlite_db, audit)
    shutil.rmtree(folder)
    assert "hot" not in registry.reload().tools
    assert failure(registry, "hot", ctx).code == "unknown_tool"


def test_a_new_skill_is_picked_up_by_the_throttled_check(home, ctx):
    config = make_config(home)
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    registry = make_registry(config, None)
    write_skill(home / "skills" / "late", "late", ok_wat("late"))
    assert registry.invoke("late", ctx, {}) == "late"  # current() looked (interval 0)


def test_a_reload_racing_a_check_does_not_lose_a_change(home, monkeypatch):
    """``reload()`` (the CLI, tests) builds without the lock the throttled check holds: two
    builds at once, and the one that read the folders first can finish last."""
    config = make_config(home)
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    registry = make_registry(config, None)
    real_discover = registry_module.discover
    holding, release = threading.Event(), threading.Event()
    slow: dict[str, threading.Thread] = {}

    def discover(sources, settings):
        found = real_discover(sources, settings)
        if threading.current_thread() is slow.get("thread"):
            holding.set()
            release.wait(5)
        return found

    monkeypatch.setattr(registry_module, "discover", discover)
    write_skill(home / "skills" / "first", "first", ok_wat(1))
    slow["thread"] = threading.Thread(target=registry.current)
    slow["thread"].start()
    try:
        assert holding.wait(5)
        write_skill(home / "skills" / "second", "second", ok_wat(2))
        assert {"first", "second"} <= set(registry.reload().wasm)
    finally:
        release.set()
        slow["thread"].join()
    assert set(registry.reload().wasm) == {"good", "first", "second"}


# -- manifests that must not take the registry down ------------------------------


BAD_MANIFESTS = {
    "unresolvable_ref": {
        "input": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        "examples": [{"input": {"a": 1}}],
    },
    "fuel_nan": {"limits": {"fuel": float("nan")}},
    "timeout_nan": {"limits": {"timeout_seconds": float("nan")}},
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_one_bad_skill_md_does_not_take_the_registry_down(home, ctx, name):
    """A worker builds its registry at start: one broken SKILL.md must be listed as a
    problem (or a skill that does not load), never an exception that stops every skill."""
    config = make_config(home)
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    write_skill(home / "skills" / name, name, ok_wat(1), **BAD_MANIFESTS[name])
    registry = make_registry(config, None)
    snapshot = registry.current()
    problems = [where.name for where, _ in snapshot.problems]
    assert problems == [name] or snapshot.wasm[name].live is None
    assert registry.invoke("good", ctx, {}) == "fine"


def test_a_skill_named_like_a_tool_is_a_problem(home, ctx):
    config = make_config(home)
    write_skill(home / "skills" / "exec", "exec", ok_wat("mine"))
    write_instructions(home / "skills" / "read", "skill_read", "hijack")
    snapshot = make_registry(config, None).current()
    assert "exec" not in snapshot.wasm and "skill_read" not in snapshot.instructions
    problems = sorted(why for _, why in snapshot.problems)
    assert len(problems) == 2 and all("is a tool" in why for why in problems)


# -- the compile cache -------------------------------------------------------------


def test_a_restarted_registry_deserialises_instead_of_compiling(home, ctx):
    config = make_config(home)
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    write_skill(home / "skills" / "other", "other", ok_wat("other"))
    first = make_registry(config, None, shared=False)
    assert (first.sandbox.cache.compiled, first.sandbox.cache.loaded) == (2, 0)
    cache = home / CACHE_DIR
    assert len(list(cache.glob("*.cwasm"))) == 2
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700

    second = make_registry(config, None, shared=False)
    assert second.sandbox.cache.compiled == 0
    assert second.sandbox.cache.loaded >= 1
    assert second.invoke("good", ctx, {}) == "fine"
    assert second.invoke("other", ctx, {}) == "other"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupted_cache_file_is_compiled_again(home, ctx, damage):
    config = make_config(home)
    write_skill(home / "skills" / "good", "good", ok_wat("fine"))
    make_registry(config, None, shared=False)
    (cached,) = (home / CACHE_DIR).glob("*.cwasm")
    good_bytes = cached.read_bytes()
    broken = b"not a compiled module" if damage == "garbage" else good_bytes[: len(good_bytes) // 2]
    cached.write_bytes(broken)

    registry = make_registry(config, None, shared=False)
    assert (registry.sandbox.cache.compiled, registry.sandbox.cache.loaded) == (1, 0)
    assert registry.invoke("good", ctx, {}) == "fine"
    assert cached.read_bytes() != broken  # replaced by a good one
    again = make_registry(config, None, shared=False)
    assert (again.sandbox.cache.compiled, again.sandbox.cache.loaded) == (0, 1)


# -- instruction skills ----------------------------------------------------------


@pytest.fixture
def library(home):
    """Instruction skills, some of which cannot run here, and one WASM skill."""
    config = make_config(home)
    skills = home / "skills"
    write_instructions(
        skills / "release_notes",
        "release_notes",
        "SECRET-BODY: write the notes from the changelog.",
        description="Write release notes from a changelog.",
    )
    write_instructions(
        skills / "deploy",
        "deploy",
        "Deploy with the token.",
        description="Deploy the service to production.",
        requires={"env": ["DEPLOY_TOKEN"], "bins": ["goclaw-test-no-such-program"]},
    )
    write_instructions(
        skills / "plan9_only",
        "plan9_only",
        "Only on Plan 9.",
        description="Something only Plan 9 does.",
        requires={"os": ["plan9"]},
    )
    write_instructions(
        skills / "shell_ok",
        "shell_ok",
        "Use sh.",
        description="Run a shell script.",
        requires={"bins": ["sh"], "env": ["HOME_FOR_TEST"], "os": ["linux", "darwin"]},
    )
    write_skill(skills / "counter", "counter", ok_wat(1), description="Count things in a text.")
    return config


def test_read_answers_the_full_text_of_an_eligible_skill(library, ctx):
    registry = make_registry(library, None, env={"HOME_FOR_TEST": "yes"})
    answer = registry.read("release_notes")
    assert answer == {
        "name": "release_notes",
        "description": "Write release notes from a changelog.",
        "instructions": "SECRET-BODY: write the notes from the changelog.",
    }
    assert registry.read("shell_ok")["instructions"] == "Use sh."
    assert "the tool 'counter'" in registry.read("counter")["instructions"]
    with pytest.raises(ToolError) as caught:
        registry.read("nothing_like_it")
    assert caught.value.code == "unknown_skill"


def test_reading_an_ineligible_skill_says_what_is_missing(library):
    registry = make_registry(library, None, env={})
    with pytest.raises(ToolError) as caught:
        registry.read("deploy")
    assert caught.value.code == "skill_ineligible"
    assert "DEPLOY_TOKEN" in caught.value.message
    assert "'goclaw-test-no-such-program' on PATH" in caught.value.message
    with pytest.raises(ToolError) as caught:
        registry.read("plan9_only")
    assert caught.value.code == "skill_ineligible"
    assert "plan9" in caught.value.message
    with pytest.raises(ToolError) as caught:
        registry.read("shell_ok")  # HOME_FOR_TEST is not set in this registry's env
    assert "HOME_FOR_TEST" in caught.value.message


def test_the_prompt_lists_eligible_names_and_descriptions_only(library):
    registry = make_registry(library, None, env={"HOME_FOR_TEST": "yes"})
    assert registry.prompt_section(["read_file", "skill_search"]) == ""
    section = registry.prompt_section(["read_file", "skill_read"])
    assert "- release_notes: Write release notes from a changelog." in section
    assert "- shell_ok: Run a shell script." in section
    assert "deploy" not in section and "plan9_only" not in section
    assert "counter" not in section  # a WASM skill is a tool, not a text
    assert "SECRET-BODY" not in section
    assert "skill_read" in section
    assert "skill_search" not in section


def test_the_prompt_points_at_skill_search_past_twenty_skills(home):
    config = make_config(home)
    for index in range(PROMPT_SKILLS + 5):
        name = f"topic_{index:02d}"
        write_instructions(home / "skills" / name, name, description=f"Topic number {index}.")
    section = make_registry(config, None).prompt_section({"skill_read"})
    listed = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(listed) == PROMPT_SKILLS
    assert listed[0].startswith("- topic_00:")
    assert "5 more" in section and "skill_search" in section


def test_search_finds_skills_of_both_kinds_and_marks_the_ineligible(library):
    registry = make_registry(library, None, env={})
    (first, *_) = registry.search("deploy to production")
    assert first["name"] == "deploy" and first["kind"] == "instructions"
    assert "DEPLOY_TOKEN" in first["ineligible"]
    (first, *_) = registry.search("count")
    assert (first["name"], first["kind"]) == ("counter", "tool")
    assert "ineligible" not in first
    assert registry.search("quantum chromodynamics") == []
    tools = registry.current().tools
    assert tools["skill_search"].run(None, {"query": "release notes"})[0]["name"] == (
        "release_notes"
    )
    assert tools["skill_read"].run(None, {"name": "release_notes"})["name"] == "release_notes"


def test_precedence_project_then_user_then_installed(home, ctx):
    user, installed = home.parent / "user", home.parent / "installed"
    config = make_config(home, user_dir=str(user), bundled_dir=str(installed))
    write_skill(installed / "same", "same", ok_wat("installed"))
    write_skill(user / "same", "same", ok_wat("user"))
    write_skill(installed / "only_installed", "only_installed", ok_wat("installed"))
    registry = make_registry(config, None)
    assert registry.invoke("same", ctx, {}) == "user"
    assert registry.current().wasm["same"].source == "user"
    assert registry.current().wasm["only_installed"].source == "installed"
    write_skill(home / "skills" / "same", "same", ok_wat("project"))
    assert registry.invoke("same", ctx, {}) == "project"
    assert registry.current().wasm["same"].source == "project"


# -- the bundled skills ----------------------------------------------------------


def bundled_folder(name: str) -> Path:
    folder = BUNDLED / name
    if not (folder / "SKILL.md").is_file():
        pytest.skip(f"the bundled skill {name} is not there yet")
    return folder


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_a_bundled_module_is_exactly_what_its_source_builds_to(name):
    manifest = read_manifest(bundled_folder(name), SkillSettings())
    assert manifest.source is not None and manifest.source.suffix == ".wat"
    built = bytes(wasmtime.wat2wasm(manifest.source.read_text(encoding="utf-8")))
    assert built == manifest.module.read_bytes(), f"rebuild {name}: make skills"


@pytest.fixture
def bundled(home, sqlite_db):
    for name in BUNDLED_NAMES:
        bundled_folder(name)
    config = make_config(home, bundled_dir=str(BUNDLED))
    return make_registry(config, sqlite_db)


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_a_bundled_skill_goes_live_and_answers_its_examples(bundled, ctx, name):
    skill = bundled.current().wasm[name]
    assert skill.source == "installed"
    assert skill.live is not None and skill.rejection is None, skill.rejection
    for example in skill.manifest.examples:
        answer = bundled.invoke(name, ctx, dict(example.input))
        if example.output is not None:
            assert answer == example.output, example.input


def test_bundled_tally_counts_across_calls(bundled, ctx):
    assert bundled.invoke("tally", ctx, {"counter": "pages", "add": 3}) == {
        "counter": "pages",
        "value": 3,
    }
    assert bundled.invoke("tally", ctx, {"counter": "pages", "add": 3})["value"] == 6
    assert bundled.invoke("tally", ctx, {"counter": "pages", "add": -10})["value"] == -4
    assert bundled.invoke("tally", ctx, {"counter": "other", "add": 0})["value"] == 0


def test_bundled_url_check_fetches_through_the_ssrf_guard(bundled, tmp_path):
    with json_server({"up": True}) as url:
        allowed = make_ctx(tmp_path, allowed_networks=LOOPBACK)
        answer = bundled.invoke("url_check", allowed, {"url": url})
        assert (answer["status"], answer["content"]) == (200, '{"up": true}')
        with pytest.raises(ToolError) as caught:
            bundled.invoke("url_check", make_ctx(tmp_path), {"url": url})
    assert caught.value.code == "ssrf_blocked"


def test_manifest_text_round_trips_through_the_reader(tmp_path):
    # The helper the other tests build SKILL.md files with writes what the reader reads.
    folder = tmp_path / "echo"
    folder.mkdir()
    (folder / "SKILL.md").write_text(
        manifest_text("echo", abi=1, module="echo.wasm", limits={"fuel": 5}, body="Body.")
    )
    manifest = read_manifest(folder, SkillSettings())
    assert (manifest.name, manifest.body, manifest.limits.fuel) == ("echo", "Body.", 5)
