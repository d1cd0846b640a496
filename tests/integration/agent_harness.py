"""Run agent turns in-process against the real broker, database and fake model server.

Every layer is the real one: a turn is submitted as an ``agent`` task,
claimed and started through the broker, run by ``AgentTurn`` with the real
router (LiteLLM over HTTP to ``FakeLLM`` on 127.0.0.1), tools and session
store, and reported back. Only Huey's consumer is left out, which the
acceptance tests cover with real worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from goclaw.agent.definitions import build_catalog
from goclaw.agent.effects import EffectLedger
from goclaw.agent.loop import AgentServices, AgentTurn
from goclaw.agent.policy_hook import EnginePolicyHook
from goclaw.agent.routing import ModelRouter
from goclaw.agent.sessions import SessionStore
from goclaw.agent.tools import BUILTIN_TOOLS
from goclaw.agent.turns import submit_turn
from goclaw.approvals import Approvals
from goclaw.audit import AuditLog, audit_path
from goclaw.broker import Broker, Outcome
from goclaw.config import load_config
from goclaw.context import TaskContext
from goclaw.errors import PermanentTaskError, TaskParked
from goclaw.fake_llm import FakeLLM, Script
from goclaw.policy import PolicyWatcher, watch_policy
from goclaw.records import TaskEvent


@dataclasses.dataclass
class Turn:
    task_id: int
    session: str
    result: dict[str, Any] | None
    error: BaseException | None
    events: list[TaskEvent]

    def of_type(self, type: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == type]

    @property
    def streamed(self) -> str:
        return "".join(e.data["delta"] for e in self.events if e.type == "chunk")


class AgentHarness:
    def __init__(self, broker: Broker, home: Path, fake: FakeLLM, base_url: str) -> None:
        self.broker = broker
        self.home = home
        self.fake = fake
        self.base_url = base_url
        self.sessions = SessionStore(broker.db)
        self.services = AgentServices(
            sessions=self.sessions,
            effects=EffectLedger(broker.db),
            router=ModelRouter(env={}),
            coalesce_seconds=0.0,
        )
        self.configure()

    def configure(
        self,
        agent: dict[str, Any] | None = None,
        models: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write config.yaml: agent ``default`` on ``openai/fake`` at the fake server."""
        agent = {
            "model": "openai/fake",
            "tools": ["read_file", "write_file", "list_dir"],
            **(agent or {}),
        }
        chain = [agent["model"], *agent.get("fallbacks", [])]
        settings = {m: {"api_base": self.base_url} for m in chain}
        for model, extra in (models or {}).items():
            settings.setdefault(model, {"api_base": self.base_url}).update(extra)
        config = {"agents": {"default": agent}, "models": settings}
        (self.home / "config.yaml").write_text(yaml.safe_dump(config))
        self.config = load_config(self.home, env={})
        self.catalog = build_catalog(self.config, BUILTIN_TOOLS)

    @property
    def workspace(self) -> Path:
        path = self.catalog.get("default").workspace
        path.mkdir(parents=True, exist_ok=True)
        return path

    def turn(self, prompt: str, *, session: str = "s1", agent: str = "default") -> Turn:
        submitted, session = submit_turn(self.broker, agent=agent, prompt=prompt, session=session)
        turn = self.run_next()
        assert turn.task_id == submitted.task_id
        return turn

    def run_next(self) -> Turn:
        """Claim the next queued turn (however it was submitted) and run it to its end."""
        [claim] = self.broker.claim("test-worker")
        args = json.loads(claim.payload)
        agent, session, prompt = args["agent"], args["session"], args["prompt"]
        self.broker.start(claim)
        ctx = TaskContext(claim)
        result, error = None, None
        try:
            result = (
                AgentTurn(
                    self.services,
                    ctx,
                    self.catalog.get(agent),
                    session_key=session,
                    prompt=prompt,
                    worker="test-worker",
                )
                .run()
                .as_json()
            )
            self.broker.report(claim, Outcome.succeeded(result))
        except PermanentTaskError as exc:
            error = exc
            self.broker.report(claim, Outcome.permanent(str(exc), exc.code))
        except TaskParked as exc:
            error = exc
            self.broker.report(claim, Outcome.parked(str(exc), exc.until))
        except Exception as exc:
            error = exc
            self.broker.report(claim, Outcome.error_from(exc))
        events = self.broker.events(claim.task_id)
        return Turn(claim.task_id, session, result, error, events)

    def use_policy(self, text: str) -> PolicyWatcher:
        """Run tools under the real engine: ``text`` as policy.yaml, audited, with approvals."""
        path = self.home / "policy.yaml"
        path.write_text(text)
        self.audit = AuditLog(self.broker.db, audit_path(self.home))
        self.policy = watch_policy(path, self.audit)
        self.approvals = Approvals(self.broker, self.audit)
        hook = EnginePolicyHook(self.policy, self.audit, self.approvals)
        self.services.policy_for = lambda agent: hook
        self.services.approvals = self.approvals
        return self.policy

    def requests(self) -> list[dict[str, Any]]:
        return self.fake.requests


@contextlib.contextmanager
def agent_harness(broker: Broker, home: Path, script: Any) -> Iterator[AgentHarness]:
    fake = FakeLLM(script if isinstance(script, Script) else Script.from_data(script))
    with fake.running() as base_url:
        yield AgentHarness(broker, home, fake, base_url)


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]


def tool_error(message: dict[str, Any]) -> str | None:
    try:
        data = json.loads(message["content"])
    except ValueError:
        return None
    return data.get("error") if isinstance(data, dict) else None
