"""``goclaw skill``: list, show, install, remove, enable, test and build skills.

Kept apart from ``goclaw/cli.py`` (which adds this group) because it is one
concept with its own vocabulary; it uses the same ``Context``, ``command``
error handling and ``--json`` conventions.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click

from goclaw.cli import Context, _audit_log, _who, command, emit_json, json_option
from goclaw.errors import GoclawError


@click.group("skill")
def skill() -> None:
    """Skills: WASM tools and instruction texts (docs/skills.md)."""


def _registry(obj: Context) -> Any:
    from goclaw.skills.registry import SkillRegistry

    return SkillRegistry(obj.config, db=obj.broker.db, audit=_audit_log(obj))


def _state(snapshot: Any, name: str, quarantined: dict[str, Any]) -> str:
    from goclaw.skills.registry import WasmSkill

    skill = snapshot.describe(name)
    if name in quarantined:
        return f"quarantined: {quarantined[name].reason}"
    if isinstance(skill, WasmSkill):
        if skill.live is None:
            return f"not loaded: {skill.rejection}"
        if skill.rejection:
            return f"live (newer version rejected: {skill.rejection})"
        return "live"
    if skill.missing:
        return "ineligible: needs " + "; ".join(skill.missing)
    return "eligible"


def _summary(snapshot: Any, name: str, quarantined: dict[str, Any]) -> dict:
    from goclaw.skills.registry import WasmSkill

    skill = snapshot.describe(name)
    return {
        "name": name,
        "kind": "wasm" if isinstance(skill, WasmSkill) else "instructions",
        "source": skill.source,
        "folder": str(skill.manifest.folder),
        "state": _state(snapshot, name, quarantined),
        "description": skill.manifest.description,
    }


@skill.command("list")
@json_option
@click.pass_obj
@command
def skill_list(obj: Context, as_json: bool) -> None:
    """Every skill found (project, user, installed), with its state."""
    registry = _registry(obj)
    snapshot = registry.current()
    quarantined = registry.health.quarantined()
    names = sorted({*snapshot.wasm, *snapshot.instructions})
    rows = [_summary(snapshot, name, quarantined) for name in names]
    problems = [{"folder": str(folder), "error": why} for folder, why in snapshot.problems]
    if as_json:
        emit_json({"skills": rows, "problems": problems})
        return
    if not rows and not problems:
        click.echo("no skills found (see docs/skills.md for where goclaw looks)")
    for row in rows:
        click.echo(f"{row['name']:<20} {row['kind']:<12} {row['source']:<9} {row['state']}")
        click.echo(f"{'':<20} {row['description']}")
    for problem in problems:
        click.echo(f"not loaded: {problem['error']}")


@skill.command("show")
@click.argument("name")
@json_option
@click.pass_obj
@command
def skill_show(obj: Context, name: str, as_json: bool) -> None:
    """One skill: manifest, limits, capabilities, state and recent faults."""
    registry = _registry(obj)
    snapshot = registry.current()
    skill = snapshot.describe(name)
    if skill is None:
        raise GoclawError(f"no skill named {name!r} (goclaw skill list shows them)")
    manifest = skill.manifest
    info = _summary(snapshot, name, registry.health.quarantined())
    if manifest.is_wasm:
        limits = manifest.limits
        info.update(
            module=str(manifest.module),
            sha256=skill.live.sha256 if skill.live else None,
            capabilities=sorted(manifest.capabilities),
            limits={
                "fuel": limits.fuel,
                "memory_bytes": limits.memory_bytes,
                "timeout_seconds": limits.timeout_seconds,
            },
            input=dict(manifest.input_schema),
            examples=len(manifest.examples),
            faults=[
                {"at": f.at, "code": f.code, "message": f.message, "task_id": f.task_id}
                for f in registry.health.faults(name)
            ],
        )
    else:
        info["requires"] = {
            "bins": list(manifest.requires.bins),
            "env": list(manifest.requires.env),
            "os": list(manifest.requires.os),
        }
    if as_json:
        emit_json(info)
        return
    for key in ("name", "kind", "source", "folder", "state", "description"):
        click.echo(f"{key + ':':<13} {info[key]}")
    if manifest.is_wasm:
        click.echo(f"{'module:':<13} {info['module']} ({(info['sha256'] or '-')[:12]})")
        click.echo(f"{'capabilities:':<13} {', '.join(info['capabilities']) or 'none'}")
        click.echo(f"{'limits:':<13} " + ", ".join(f"{k} {v}" for k, v in info["limits"].items()))
        click.echo(f"{'input:':<13} {json.dumps(info['input'])}")
        for fault in info["faults"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fault["at"]))
            click.echo(f"fault {when}  {fault['code']}  {fault['message']}")
    click.echo()
    click.echo(manifest.body)


@skill.command("install")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a project skill of the same name.")
@json_option
@click.pass_obj
@command
def skill_install(obj: Context, path: Path, force: bool, as_json: bool) -> None:
    """Copy the skill folder PATH into $GOCLAW_HOME/skills, after it passes staging.

    A WASM skill is compiled, instantiated and self-tested first; one that fails
    any phase is not installed. Workers pick the new skill up within a second.
    """
    from goclaw.skills.manifest import read_manifest
    from goclaw.skills.registry import stage_folder

    manifest = read_manifest(path, obj.config.skills)
    if manifest.is_wasm:
        stage_folder(manifest, obj.config)
    target = obj.config.home / "skills" / manifest.name
    if target.exists():
        if not force:
            raise GoclawError(f"{target} exists: --force replaces it")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(path, target)
    if as_json:
        emit_json({"name": manifest.name, "installed": str(target)})
    else:
        click.echo(f"installed {manifest.name} in {target}")


@skill.command("remove")
@click.argument("name")
@json_option
@click.pass_obj
@command
def skill_remove(obj: Context, name: str, as_json: bool) -> None:
    """Delete project skill NAME ($GOCLAW_HOME/skills/NAME)."""
    from goclaw.skills.discovery import PROJECT

    snapshot = _registry(obj).current()
    skill = snapshot.describe(name)
    if skill is None:
        raise GoclawError(f"no skill named {name!r}")
    if skill.source != PROJECT:
        raise GoclawError(
            f"{name} is a {skill.source} skill ({skill.manifest.folder}); goclaw removes "
            "only the project's skills, in $GOCLAW_HOME/skills"
        )
    shutil.rmtree(skill.manifest.folder)
    if as_json:
        emit_json({"name": name, "removed": str(skill.manifest.folder)})
    else:
        click.echo(f"removed {name} ({skill.manifest.folder})")


@skill.command("enable")
@click.argument("name")
@json_option
@click.pass_obj
@command
def skill_enable(obj: Context, name: str, as_json: bool) -> None:
    """Lift the quarantine of skill NAME; its earlier faults stop counting."""
    registry = _registry(obj)
    if registry.current().describe(name) is None:
        raise GoclawError(f"no skill named {name!r}")
    lifted = registry.health.enable(name, by=_who())
    if as_json:
        emit_json({"name": name, "was_quarantined": lifted is not None})
    elif lifted is None:
        click.echo(f"{name} was not quarantined")
    else:
        click.echo(f"{name} enabled (it was quarantined: {lifted.reason})")


@skill.command("test")
@click.argument("name")
@click.option("--input", "raw_input", default="{}", show_default=True, help="Arguments, JSON.")
@click.option("--agent", default="cli", show_default=True, help="Whose policy rules apply.")
@json_option
@click.pass_obj
@command
def skill_test(obj: Context, name: str, raw_input: str, agent: str, as_json: bool) -> None:
    """Run WASM skill NAME once with --input, under the policy, as a worker would."""
    from goclaw.agent.policy_hook import EnginePolicyHook
    from goclaw.agent.tools import ToolContext, ToolError, get_tool, invoke, parse_arguments
    from goclaw.policy import policy_path, watch_policy

    registry = _registry(obj)
    tools = registry.tools()
    if name not in registry.current().wasm:
        raise GoclawError(f"no WASM skill named {name!r} (goclaw skill list shows them)")
    audit = registry.audit
    workspace = obj.config.home / "workspaces" / agent
    ctx = ToolContext(
        workspace=workspace,
        agent_id=agent,
        task_id=0,
        session_key="",
        policy=EnginePolicyHook(watch_policy(policy_path(obj.config.home), audit), audit),
    )
    tool = get_tool(name, [name], tools)
    started = time.perf_counter()
    try:
        result: Any = {"ok": invoke(tool, ctx, parse_arguments(tool, raw_input))}
    except ToolError as exc:
        result = {"error": {"code": exc.code, "message": exc.message}}
    result["seconds"] = round(time.perf_counter() - started, 6)
    if as_json:
        emit_json(result)
    elif "ok" in result:
        click.echo(json.dumps(result["ok"], indent=2, ensure_ascii=False))
    else:
        click.echo(f"{result['error']['code']}: {result['error']['message']}")
    if "error" in result:
        raise SystemExit(1)


@skill.command("build")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
@click.pass_obj
@command
def skill_build(obj: Context, path: Path, as_json: bool) -> None:
    """Compile the skill folder's .wat source into its module (wasmtime's wat2wasm)."""
    from goclaw.skills.build import build_module

    module, wasm = build_module(path, obj.config.skills)
    if as_json:
        emit_json({"module": str(module), "bytes": len(wasm)})
    else:
        click.echo(f"built {module} ({len(wasm)} bytes)")
