"""``ggufllm serve --replicas N``: start (or join) a Ray cluster, run the app, drain on exit."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import GgufllmError
from ..server.config import ServerConfig
from .build import ClusterOptions, build_app

__all__ = ["serve_cluster", "APP_NAME"]

logger = logging.getLogger(__name__)

APP_NAME = "ggufllm"


def serve_cluster(model: str | None, *, host: str, port: int, options: ClusterOptions,
                  settings: Settings, server: ServerConfig, ray_address: str | None,
                  echo: Callable[[str], Any] = print) -> None:
    """Serves until SIGINT/SIGTERM, then drains: Ray stops routing to the replicas, lets
    running requests finish for ``drain_timeout_s``, and frees each model.

    Args:
        ray_address: ``auto`` or ``HOST:PORT`` of a running cluster (it keeps running
            after; only this app is deleted); None starts a local one on loopback.
    """
    import ray
    from ray import serve

    # nothing leaves the machine unless asked: Ray's usage report is off by default here
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray_address is None:
        ray.init(include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        echo(f"ggufllm: starting {_describe(options)} on http://{host}:{port} (GET /health "
             "counts the replicas running)")
        try:
            serve.run(build_app(model, options=options, settings=settings, server=server),
                      name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # Ray's "Deploying application failed": say why
            raise GgufllmError(f"the replicas did not start: {_why(serve) or exc}") from None
        echo(f"ggufllm: serving on http://{host}:{port}")
        while not stop.wait(1.0):
            pass
        echo("ggufllm: draining (running requests may finish; signal again to stop now)")
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process
        serve.delete(APP_NAME)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray_address is None:
            serve.shutdown()
        ray.shutdown()


def _why(serve: Any) -> str | None:
    """The failing deployment's message (a replica's exception), if Ray has one."""
    app = serve.status().applications.get(APP_NAME)
    for deployment in (app.deployments.values() if app else ()):
        if deployment.message:
            return str(deployment.message).strip().splitlines()[-1]
    return None


def _describe(options: ClusterOptions) -> str:
    if options.autoscaling:
        return (f"{options.min_replicas} to {options.max_replicas} replicas (autoscaling, "
                f"{options.replicas} at start)")
    return f"{options.replicas} replica{'s' if options.replicas != 1 else ''}"
