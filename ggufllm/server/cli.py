"""``ggufllm serve`` and ``ggufllm bench`` (registered on the main CLI)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

import click

__all__ = ["serve", "bench"]

logger = logging.getLogger(__name__)


def _overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


@click.command()
@click.option("--model", "-m", type=click.Path(), default=None,
              help="A .gguf file or a folder of them (default: LLM_MODEL_PATH, then the embedded "
                   "model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="GGUFLLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env "
                   "GGUFLLM_API_KEY; set but empty is an error).")
@click.option("--parallel", type=click.IntRange(1, 256), default=None,
              help="Requests decoded together (N_PARALLEL, default 4).")
@click.option("--max-queue", type=click.IntRange(0, 1 << 16), default=None,
              help="Requests waiting for a slot before 429 (MAX_QUEUE, default 64).")
@click.option("--ctx", "max_length", type=int, default=None,
              help="Context window in tokens (MAX_LENGTH, default 4096).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A web page's origin (https://app.example) allowed to call the API from a "
                   "browser; others are refused (repeatable; env GGUFLLM_CORS_ORIGINS).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host name accepted on a loopback address besides localhost and the "
                   "loopback IPs, e.g. a reverse proxy's (repeatable; * = any; env "
                   "GGUFLLM_ALLOWED_HOSTS).")
@click.option("--alias", default=None, help="The model id clients use (default: the file name).")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=None,
              help="On SIGTERM/Ctrl-C, seconds running requests may finish while new ones get "
                   "503 (env GGUFLLM_DRAIN_TIMEOUT_S, default 30; a second signal stops now).")
@click.option("--write-timeout", type=click.FloatRange(0.001, 3600), default=None,
              help="Drop a streaming client that takes no data for this many seconds and "
                   "cancel its generation (env GGUFLLM_WRITE_TIMEOUT_S, default 30).")
@click.option("--hide-cached-tokens", is_flag=True, default=None,
              help="Report usage.prompt_tokens_details.cached_tokens as 0, for a key shared by "
                   "users who must not learn whether others sent the same document (env "
                   "GGUFLLM_REPORT_CACHED_TOKENS=false).")
@click.option("--insecure-no-key", is_flag=True, default=False,
              help="Serve a non-loopback --host without an API key (anyone who can reach the "
                   "port can use the model); without it, serve refuses to start.")
@click.option("--replicas", type=click.IntRange(1, 4096), default=None,
              help="Serve N replicas of the model on Ray Serve, each request routed to the "
                   "replica that holds its document (needs ggufllm[ray]; docs/ray.md).")
@click.option("--ray-address", default=None,
              help="With --replicas: join this Ray cluster (auto, or HOST:PORT) instead of "
                   "starting one on this machine.")
@click.option("--min-replicas", type=click.IntRange(0, 4096), default=None,
              help="With --replicas: autoscale from this many...")
@click.option("--max-replicas", type=click.IntRange(1, 4096), default=None,
              help="...to this many, on the requests running per replica (target: --parallel).")
@click.option("--replica-cpus", type=click.FloatRange(0, 1024), default=None,
              help="With --replicas: CPUs per replica (default 1; also its threads when "
                   "N_THREADS is unset).")
@click.option("--replica-gpus", type=click.FloatRange(0, 64), default=None,
              help="With --replicas: GPUs per replica (1 on a GPU cluster; default 0).")
def serve(model: str | None, host: str, port: int, api_key: str | None, parallel: int | None,
          max_queue: int | None, max_length: int | None, cors_origins: tuple[str, ...],
          allowed_hosts: tuple[str, ...], alias: str | None, drain_timeout: float | None,
          write_timeout: float | None, hide_cached_tokens: bool | None,
          insecure_no_key: bool, replicas: int | None, ray_address: str | None,
          min_replicas: int | None, max_replicas: int | None, replica_cpus: float | None,
          replica_gpus: float | None) -> None:
    """Serve the model over HTTP: OpenAI's API, /answer, /metrics and a page at /."""
    import uvicorn

    from ..service import LLMService
    from .config import load_server_config
    from .factory import create_app

    config = load_server_config(api_key=api_key, cors_origins=cors_origins or None,
                                allowed_hosts=allowed_hosts or None, model_alias=alias,
                                drain_timeout_s=drain_timeout, write_timeout_s=write_timeout,
                                report_cached_tokens=False if hide_cached_tokens else None)
    if not config.api_key and not _is_loopback(host):
        # checked before the model loads: a misconfigured container fails at once, not
        # after minutes of loading, and never serves an open endpoint meanwhile
        if not insecure_no_key:
            raise click.UsageError(
                f"--host {host} is reachable from the network and no API key is set: set "
                "GGUFLLM_API_KEY (or --api-key), or pass --insecure-no-key to serve without one")
        logger.warning("listening on %s without an API key: anyone who can reach it can use it",
                       host)
    engine = _overrides(n_parallel=parallel, max_queue=max_queue, max_length=max_length)
    cluster = _overrides(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                         replica_cpus=replica_cpus, replica_gpus=replica_gpus)
    if replicas is not None:
        _serve_on_ray(model, host, port, config, engine, cluster, ray_address)
        return
    if cluster or ray_address:
        raise click.UsageError("--ray-address, --min/--max-replicas and --replica-cpus/gpus go "
                               "with --replicas N")
    service = LLMService(model, **engine)
    app = create_app(service, config)
    click.echo(f"ggufllm: serving on http://{host}:{port} (the model loads in the background; "
               "GET /health says when it is ready)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


def _serve_on_ray(model: str | None, host: str, port: int, config: Any,
                  engine: dict[str, Any], cluster: dict[str, Any], ray_address: str | None) -> None:
    """``serve --replicas N``: the same app on Ray Serve (imported only here)."""
    try:
        from ..ray.build import load_cluster_options
        from ..ray.launch import serve_cluster
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("ray"):
            raise
        if getattr(sys, "frozen", False):  # a PyInstaller bundle leaves Ray out
            raise click.UsageError("--replicas needs Ray Serve, which the bundle leaves out: "
                                   "run it from a pip install of 'ggufllm[ray]'") from None
        raise click.UsageError("--replicas needs Ray Serve: pip install 'ggufllm[ray]'") from None
    from ..config import load_settings

    serve_cluster(model, host=host, port=port, options=load_cluster_options(**cluster),
                  settings=load_settings(**engine), server=config, ray_address=ray_address,
                  echo=lambda line: click.echo(line, err=True))


@click.command()
@click.option("--url", default=None,
              help="A running server (ggufllm or any OpenAI-compatible one); default: start "
                   "ggufllm on a free local port.")
@click.option("--concurrency", default="1,4,8", show_default=True,
              help="Comma-separated numbers of concurrent clients.")
@click.option("--requests", "n_requests", type=click.IntRange(1, 10_000), default=16,
              show_default=True, help="Requests per concurrency level.")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=64, show_default=True)
@click.option("--model", "-m", type=click.Path(), default=None,
              help="Model for the server bench starts (ignored with --url).")
@click.option("--api-key", envvar="GGUFLLM_API_KEY", default=None)
@click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="completions",
              show_default=True, help="Which OpenAI route the requests use.")
def bench(url: str | None, concurrency: str, n_requests: int, max_tokens: int, model: str | None,
          api_key: str | None, endpoint: str) -> None:
    """Aggregate tokens/s and p50/p95 time to first token at each concurrency, against the same
    requests sent one at a time."""
    from .bench import BenchOptions, parse_levels, run_bench

    levels = parse_levels(concurrency)
    options = BenchOptions(levels=levels, n_requests=n_requests, max_tokens=max_tokens,
                           api_key=api_key, endpoint=endpoint)
    for line in run_bench(url, options, model):
        click.echo(line)
