"""The ``agent`` task kind: what a worker process needs to run agent turns.

One ``AgentRuntime`` per worker process holds what turns share: the agent
catalog (hot-reloaded from config.yaml), the policy (hot-reloaded from
policy.yaml) with the audit log and the approval store, the model router with
its circuit breaker, the session store and the effect ledger. Each turn takes
the catalog's current definition when it starts and keeps it to the end, so an
edit never changes a running turn; the policy, on the other hand, is asked
afresh at every decision, so a narrowing edit reaches running turns too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from goclaw.agent.definitions import AgentCatalog, AgentDefinition, UnknownAgent
from goclaw.agent.effects import EffectLedger
from goclaw.agent.heartbeat import register_heartbeat_kind
from goclaw.agent.loop import AgentServices, AgentTurn
from goclaw.agent.policy_hook import EnginePolicyHook
from goclaw.agent.routing import ModelRouter
from goclaw.agent.sessions import SessionStore
from goclaw.agent.turns import AGENT_KIND, check_session_key
from goclaw.app import App
from goclaw.approvals import Approvals
from goclaw.audit import AuditLog, audit_path
from goclaw.config import HOSTED_MODEL_KEY_ENV, Config
from goclaw.context import TaskContext
from goclaw.errors import PermanentTaskError
from goclaw.policy import RELOAD_CHECK_SECONDS, policy_path, watch_policy
from goclaw.redact import Scrubber
from goclaw.secrets import KEY_ENV, SecretStore
from goclaw.skills.discovery import KnownTools
from goclaw.skills.registry import SkillRegistry
from goclaw.store.database import Database

log = logging.getLogger(__name__)


class AgentRuntime:
    def __init__(
        self,
        config: Config,
        app: App,
        *,
        env: Mapping[str, str] | None = None,
        services: AgentServices | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.broker = app.broker
        db = app.broker.db
        stored = stored_secrets(db, env)
        # Fails closed: a worker with an invalid agent config or policy does not start.
        self.catalog = AgentCatalog.from_config(config, env, KnownTools(config))
        self.audit = AuditLog(db, audit_path(config.home))
        self.policy = watch_policy(policy_path(config.home), self.audit)
        approvals = Approvals(app.broker, self.audit)
        hook = EnginePolicyHook(self.policy, self.audit, approvals)
        # A skill that does not load is listed with its fault; it never stops the worker.
        self.skills = SkillRegistry(config, db=db, audit=self.audit, env=env)
        self.services = services or AgentServices(
            sessions=SessionStore(db),
            effects=EffectLedger(db),
            router=ModelRouter(env=provider_env(env, stored)),
            doorbell=app.broker.doorbell,
            scrubber=build_scrubber(config, env, stored),
            policy_for=lambda agent: hook,
            approvals=approvals,
            toolbox=self.skills,
        )
        self._slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()

    def watch_policy_file(self) -> None:
        """Check policy.yaml and the skill folders twice a second even when no tool runs,
        so that a bad edit is logged and audited when it is made, not at the next call."""

        def loop() -> None:
            while True:
                time.sleep(RELOAD_CHECK_SECONDS)
                try:
                    self.policy.current()
                    self.skills.current()  # a rejected skill reload is reported when made too
                except Exception:  # pragma: no cover - current() handles its own errors
                    log.exception("policy or skill check failed")

        threading.Thread(target=loop, name="policy-watch", daemon=True).start()

    def warm_up(self) -> None:
        """Import LiteLLM in the background, so the first turn does not wait seconds for it."""
        from goclaw.agent.routing import import_litellm

        threading.Thread(target=import_litellm, name="litellm-import", daemon=True).start()

    def run_turn(
        self, ctx: TaskContext, *, prompt: str, agent: str, session: str
    ) -> dict[str, Any]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PermanentTaskError("an agent turn needs a non-empty prompt")
        try:
            check_session_key(session if isinstance(session, str) else "")
        except ValueError as exc:
            raise PermanentTaskError(str(exc)) from exc
        try:
            definition = self.catalog.current().get(agent)
        except UnknownAgent as exc:
            raise PermanentTaskError(str(exc), code="unknown_agent") from exc
        with self._slot(ctx, definition):
            turn = AgentTurn(
                self.services,
                ctx,
                definition,
                session_key=session,
                prompt=prompt,
                worker=ctx.claim.owner,
            )
            return turn.run().as_json()

    def _slot(self, ctx: TaskContext, agent: AgentDefinition) -> _Slot:
        """Honour the agent's ``concurrency`` within this worker process."""
        key = (agent.id, agent.settings.concurrency)
        with self._slots_lock:
            semaphore = self._slots.setdefault(
                key, threading.BoundedSemaphore(agent.settings.concurrency)
            )
        return _Slot(semaphore, ctx)


class _Slot:
    def __init__(self, semaphore: threading.BoundedSemaphore, ctx: TaskContext) -> None:
        self.semaphore = semaphore
        self.ctx = ctx

    def __enter__(self) -> None:
        while not self.semaphore.acquire(timeout=0.25):
            self.ctx.check()

    def __exit__(self, *exc: object) -> None:
        self.semaphore.release()


def register_agent_kind(
    app: App, config: Config, *, env: Mapping[str, str] | None = None
) -> AgentRuntime:
    """Add the ``agent`` kind (prompt, agent, session) and the ``heartbeat`` kind (agent)."""
    runtime = AgentRuntime(config, app, env=env)

    @app.kind(AGENT_KIND)
    def agent(ctx: TaskContext, prompt: str, agent: str, session: str) -> dict[str, Any]:
        return runtime.run_turn(ctx, prompt=prompt, agent=agent, session=session)

    register_heartbeat_kind(app, runtime)
    return runtime


def stored_secrets(db: Database, env: Mapping[str, str]) -> dict[str, str]:
    """The secret store's contents when ``GOCLAW_ENCRYPTION_KEY`` is set (an invalid key
    stops the worker: fail closed); nothing when it is not."""
    return SecretStore.from_env(db, env).items() if env.get(KEY_ENV) else {}


def provider_env(env: Mapping[str, str], stored: Mapping[str, str]) -> dict[str, str]:
    """What ``api_key_env`` names are looked up in: a non-empty environment variable
    first, then the encrypted store."""
    return {**env, **{name: value for name, value in stored.items() if not env.get(name)}}


def build_scrubber(config: Config, env: Mapping[str, str], stored: Mapping[str, str]) -> Scrubber:
    """Every secret a worker could leak through a tool: the provider keys its models read
    from the environment, and every stored secret. Built at start; a secret added later is
    still caught by the credential patterns, and by value after a restart."""
    names = {m.api_key_env for m in config.models.values() if m.api_key_env}
    names.add(HOSTED_MODEL_KEY_ENV)
    values = [env[name] for name in sorted(names) if env.get(name)]
    return Scrubber([*values, *stored.values()])
