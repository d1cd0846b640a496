"""Where skills are found, which one wins a name, and whether an instruction skill can run here.

Three places, in order of precedence (``docs/skills.md``): the project
(``$GOCLAW_HOME/skills``), the user's (``skills.user_dir``) and the installed
ones shipped with goclaw (``skills.bundled_dir``). Discovery only reads
manifests; compiling modules is the registry's business.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from goclaw.agent.tools import SKILL_TOOLS, registered_tools
from goclaw.config import Config, SkillSettings
from goclaw.filewatch import Stamp, stamp
from goclaw.skills.manifest import MANIFEST_FILE, Manifest, ManifestError, read_manifest

PROJECT = "project"
USER = "user"
INSTALLED = "installed"
#: This checkout's bundled skills (``skills/`` beside the package).
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "skills"


@dataclasses.dataclass(frozen=True)
class Source:
    label: str
    path: Path


@dataclasses.dataclass(frozen=True)
class Found:
    """One skill as discovery saw it: the winner of its name."""

    manifest: Manifest
    source: str
    #: Folders of the same name in places of lower precedence, hidden by this one.
    shadows: tuple[Path, ...] = ()


@dataclasses.dataclass(frozen=True)
class Discovery:
    skills: Mapping[str, Found]
    #: ``SKILL.md`` files that did not load: (folder, ``path: key: why``).
    problems: tuple[tuple[Path, str], ...]


def skill_sources(config: Config) -> list[Source]:
    settings = config.skills
    bundled = Path(settings.bundled_dir).expanduser() if settings.bundled_dir else BUNDLED_DIR
    return [
        Source(PROJECT, config.home / "skills"),
        Source(USER, Path(settings.user_dir).expanduser()),
        Source(INSTALLED, bundled),
    ]


def skill_folders(sources: list[Source]) -> list[tuple[Source, Path]]:
    """Every folder holding a ``SKILL.md``, source by source, each sorted by name."""
    found = []
    for source in sources:
        try:
            entries = sorted(source.path.iterdir())
        except OSError:
            continue  # a place that does not exist holds no skills
        found.extend((source, entry) for entry in entries if (entry / MANIFEST_FILE).is_file())
    return found


def discover(sources: list[Source], settings: SkillSettings) -> Discovery:
    skills: dict[str, Found] = {}
    problems = []
    for source, folder in skill_folders(sources):
        try:
            manifest = read_manifest(folder, settings)
        except ManifestError as exc:
            problems.append((folder.resolve(), str(exc)))
            continue
        held = skills.get(manifest.name)
        if held is None:
            skills[manifest.name] = Found(manifest, source.label)
        else:
            skills[manifest.name] = dataclasses.replace(held, shadows=(*held.shadows, folder))
    return Discovery(skills=skills, problems=tuple(problems))


def stamps(sources: list[Source]) -> tuple[tuple[Path, Stamp], ...]:
    """What a change of any skill moves: each folder's manifest, module and source."""
    files: list[Path] = [source.path for source in sources]
    for _, folder in skill_folders(sources):
        files.extend(sorted(folder.iterdir()))
    return tuple((path, stamp(path)) for path in files)


def missing_requirements(
    manifest: Manifest,
    env: Mapping[str, str] | None = None,
    *,
    which: Callable[[str], str | None] = shutil.which,
    platform: str = sys.platform,
) -> list[str]:
    """What this machine lacks for the skill, in words; empty: it is eligible."""
    env = os.environ if env is None else env
    requires = manifest.requires
    missing = [f"the program {name!r} on PATH" for name in requires.bins if which(name) is None]
    missing += [f"the environment variable {name}" for name in requires.env if not env.get(name)]
    if requires.os and not any(platform.startswith(name) for name in requires.os):
        missing.append(f"one of the systems {', '.join(requires.os)} (this is {platform})")
    return missing


class KnownTools(Collection[str]):
    """The tool names an agent may list: the built-ins, the skill tools and every WASM skill
    found now. Live: the agent catalog checks it on each reload, so a skill added while a
    process runs can be listed without a restart (manifests are read, nothing compiled)."""

    def __init__(self, config: Config) -> None:
        self.sources = skill_sources(config)
        self.settings = config.skills

    def _names(self) -> set[str]:
        found = discover(self.sources, self.settings).skills
        wasm = {name for name, skill in found.items() if skill.manifest.is_wasm}
        return {*registered_tools(), *SKILL_TOOLS, *wasm}

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(self._names())
