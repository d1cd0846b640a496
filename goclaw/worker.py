"""``goclaw worker``: Huey's consumer over the durable broker.

A worker process claims leased tasks for one queue and runs them with
Huey's thread or process workers. Everything durable happens in the broker;
this module only wires the pieces together and shuts them down in order:
stop claiming, finish or release running tasks, commit their outcomes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

from huey.consumer import Consumer

from goclaw.app import App
from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.doorbell import Doorbell
from goclaw.errors import ConfigError
from goclaw.huey_storage import new_worker_id
from goclaw.kinds import register_builtin_kinds
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

log = logging.getLogger(__name__)


class GoclawConsumer(Consumer):
    """Huey's consumer, whose forked children never outlive it.

    A process worker orphaned by a SIGKILL of its parent would keep
    heartbeating leases that nobody supervises; with PR_SET_PDEATHSIG it
    dies too, its leases expire, and the reaper requeues its tasks.
    """

    def _create_process(self, process: Any, name: str) -> Any:
        proc = super()._create_process(process, name)
        if self.environment.forks:
            run = proc._target
            proc._target = lambda: (_die_with_parent(), run())
        return proc


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        log.warning("PR_SET_PDEATHSIG unavailable: forked workers may outlive their parent")


def open_broker(config: Config) -> Broker:
    """Open (and migrate) the configured database and return a broker over it."""
    db = Database(config.database_url, busy_timeout_seconds=config.database.busy_timeout_seconds)
    migrate(db)
    return Broker(db, config.broker, doorbell=Doorbell.for_database(db))


def build_app(
    broker: Broker,
    *,
    queue: str,
    concurrency: int,
    prefetch: int = 1,
    worker_id: str | None = None,
    kind_modules: Sequence[str] = (),
    config: Config | None = None,
) -> App:
    """The app a worker serves: built-in kinds, agent turns (given a config), user kinds."""
    app = App(
        broker,
        queue=queue,
        concurrency=concurrency,
        prefetch=prefetch,
        worker_id=worker_id or new_worker_id(),
    )
    register_builtin_kinds(app)
    if config is not None:
        from goclaw.agent.runtime import register_agent_kind

        runtime = register_agent_kind(app, config)
        runtime.watch_policy_file()
        if config.worker.preload_models:
            runtime.warm_up()
    for module in kind_modules:
        load_kinds(app, module)
    return app


def load_kinds(app: App, module_name: str) -> None:
    """Import ``module_name`` and let its ``register(app)`` add task kinds.

    Fails closed: a worker that cannot load the kinds it was asked to serve
    does not start, rather than failing every such task as unknown.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--kinds {module_name}: cannot import it: {exc}") from exc
    register = getattr(module, "register", None)
    if not callable(register):
        raise ConfigError(f"--kinds {module_name}: the module has no register(app) function")
    register(app)


def run_worker(
    config: Config,
    *,
    concurrency: int | None = None,
    queue: str | None = None,
    worker_type: str | None = None,
    kind_modules: Sequence[str] = (),
) -> None:
    """Run until SIGINT (graceful: running tasks finish) or SIGTERM (they are released)."""
    settings = config.worker
    concurrency = concurrency or settings.concurrency
    queue = queue or settings.queue
    worker_type = worker_type or settings.worker_type
    broker = open_broker(config)
    app = build_app(
        broker,
        queue=queue,
        concurrency=concurrency,
        prefetch=settings.prefetch,
        kind_modules=kind_modules,
        config=config,
    )
    consumer = GoclawConsumer(
        app.huey,
        workers=concurrency,
        worker_type=worker_type,
        periodic=False,
        check_worker_health=True,
        health_check_interval=1,
    )
    log.info(
        "goclaw worker: queue=%s concurrency=%d type=%s database=%s",
        queue,
        concurrency,
        worker_type,
        broker.db.describe(),
    )
    try:
        consumer.run()
    finally:
        app.storage.flush()
        app.storage.stop_process_services()
        broker.close()
