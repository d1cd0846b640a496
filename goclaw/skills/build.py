"""Building a skill's module from its WebAssembly text source.

``wasmtime.wat2wasm`` comes with the wasmtime wheel from PyPI, so the bundled
skills build with nothing from outside the package registries, and the same
text always gives the same bytes (a test holds the committed modules to that).
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

from goclaw.config import SkillSettings
from goclaw.skills.manifest import ManifestError, read_manifest


def build_module(folder: Path, settings: SkillSettings | None = None) -> tuple[Path, bytes]:
    """Compile the folder's ``source`` into its ``module``; answer the module's path and bytes.

    Only WebAssembly text (``.wat``) sources are built here; a module built by another
    toolchain is committed as it is, with its source beside it.
    """
    manifest = read_manifest(folder, settings or SkillSettings())
    if manifest.module is None:
        raise ManifestError(f"{manifest.path}: an instruction skill has no module to build")
    source = manifest.source
    if source is None or source.suffix != ".wat":
        raise ManifestError(f"{manifest.path}: source: only a .wat source can be built here")
    try:
        wasm = bytes(wasmtime.wat2wasm(source.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read: {exc.strerror}") from None
    except wasmtime.WasmtimeError as exc:
        raise ManifestError(f"{source}: not valid WebAssembly text: {exc}") from None
    if not manifest.module.exists() or manifest.module.read_bytes() != wasm:
        manifest.module.write_bytes(wasm)
    return manifest.module, wasm
