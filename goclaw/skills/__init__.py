"""Skills: WASM modules agents call as tools, and instruction texts agents read on demand.

- ``manifest``: ``SKILL.md`` parsed and checked;
- ``discovery``: where skills are found, precedence, eligibility;
- ``sandbox``: one invocation under wasmtime's fuel, memory and time limits;
- ``quarantine``: faults kept in the database, and the quarantine they lead to;
- ``registry``: a worker's live skills, hot-reloaded in three phases, as tools;
- ``search``: BM25 over names and descriptions;
- ``build``: WebAssembly text to module, for the bundled skills.

``docs/skills.md`` is the user's and the skill author's guide (ABI v1). Only
``sandbox`` and what imports it load wasmtime.
"""
