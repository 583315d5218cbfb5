"""The Ray Serve application: an ingress and N model replicas, and how to size them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from ..config import Settings, load_settings
from ..errors import ConfigError, ModelNotFoundError
from ..resolve import resolve_model
from ..server.config import ServerConfig, load_server_config
from .gateway import Gateway
from .replica import LLMReplica
from .router import PrefixAffinityRouter

__all__ = ["ClusterOptions", "build_app", "load_cluster_options", "REPLICA_DEPLOYMENT",
           "INGRESS_DEPLOYMENT"]

REPLICA_DEPLOYMENT = "LLMReplica"
INGRESS_DEPLOYMENT = "Ingress"


class ClusterOptions(BaseSettings):
    """How many replicas, with what resources, routed how; read from ``GGUFLLM_RAY_*``
    (for ``serve run ggufllm.ray:app``) or given by ``ggufllm serve --replicas``."""

    model_config = SettingsConfigDict(env_prefix="GGUFLLM_RAY_", extra="forbid",
                                      case_sensitive=False)

    replicas: int = Field(2, ge=1, le=4096, description="replicas at start (fixed, without "
                          "min/max)")
    min_replicas: int | None = Field(None, ge=0, le=4096, description="autoscaling floor")
    max_replicas: int | None = Field(None, ge=1, le=4096, description="autoscaling ceiling")
    replica_cpus: float = Field(1.0, ge=0.0, le=1024.0, allow_inf_nan=False,
                                description="CPUs Ray reserves per replica (also its threads "
                                "when N_THREADS is unset)")
    replica_gpus: float = Field(0.0, ge=0.0, le=64.0, allow_inf_nan=False,
                                description="GPUs per replica (1 on a GPU cluster; a fraction "
                                "packs several small replicas on one GPU)")
    routing: Literal["affinity", "default"] = Field(
        "affinity", description="affinity: prompt-prefix affine with bounded load; default: "
        "Ray's power of two choices")
    max_imbalance: int | None = Field(None, ge=0, le=1 << 16, description="how many more "
                                      "requests than the least-loaded replica the affine "
                                      "replica may run (default: half its slots)")
    attempts: int = Field(3, ge=1, le=16, description="replicas tried for one request when "
                          "replicas are lost")
    upscale_delay_s: float = Field(5.0, ge=0.0, le=3600.0, allow_inf_nan=False)
    downscale_delay_s: float = Field(60.0, ge=0.0, le=86400.0, allow_inf_nan=False)
    look_back_period_s: float = Field(30.0, gt=0.0, le=3600.0, allow_inf_nan=False,
                                      description="autoscaling averages the load over this")
    max_queued_requests: int = Field(-1, ge=-1, le=1 << 20, description="requests the ingress "
                                     "holds for busy replicas before 429 (-1: no limit)")

    @model_validator(mode="after")
    def _bounds(self) -> ClusterOptions:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas (autoscaling), or "
                             "neither (a fixed number)")
        if self.min_replicas is not None and self.max_replicas is not None:
            if self.min_replicas > self.max_replicas:
                raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas "
                                 f"({self.max_replicas})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


def load_cluster_options(**overrides: Any) -> ClusterOptions:
    """Reads :class:`ClusterOptions` from ``GGUFLLM_RAY_*`` with ``overrides`` on top.

    Raises:
        ConfigError: a value is invalid.
    """
    try:
        return ClusterOptions(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "GGUFLLM_RAY_" + str(err["loc"][0]).upper() if err["loc"] else None
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting: {name or 'replicas'}: {message}", name) from None


def _model_for_replicas(model: str | None, settings: Settings) -> str | None:
    """The model file replicas load: one found here is passed as an absolute path (replicas
    do not share this process's working directory); the embedded default as None (each
    replica finds its own); a path not found here as given (it may exist on the hosts)."""
    try:
        resolved = resolve_model(model, env_path=settings.llm_model_path,
                                 use_quantization=settings.use_quantization,
                                 load_in_8bit=settings.load_in_8bit,
                                 load_in_4bit=settings.load_in_4bit)
    except ModelNotFoundError:
        return model if model is not None else settings.llm_model_path
    return None if resolved.is_default else str(resolved.path.resolve())


def build_app(model: str | None = None, *, options: ClusterOptions | None = None,
              settings: Settings | None = None, server: ServerConfig | None = None,
              name_prefix: str = "") -> Application:
    """The Serve application ``ggufllm serve --replicas`` and ``serve run ggufllm.ray:app`` run.

    The settings are read here, once, and travel to every replica: a replica on
    another host gets this machine's configuration, not its own environment.

    Args:
        model: a ``.gguf`` file or folder (None: ``LLM_MODEL_PATH``, then the embedded model).
        options: replicas, resources, routing (None: ``GGUFLLM_RAY_*``).
        settings: the service's settings (None: the environment).
        server: the server's settings (None: ``GGUFLLM_*``).
        name_prefix: put before the deployments' names (two applications in one cluster).

    Raises:
        ConfigError: a setting is invalid.
    """
    options = options if options is not None else load_cluster_options()
    settings = settings if settings is not None else load_settings()
    server = server if server is not None else load_server_config()
    if settings.n_threads is None and options.replica_cpus >= 1:
        settings = settings.model_copy(update={"n_threads": int(options.replica_cpus)})
    model = _model_for_replicas(model, settings)
    slots = settings.n_parallel
    scaling: dict[str, Any]
    if options.autoscaling:
        assert options.min_replicas is not None and options.max_replicas is not None
        scaling = {"autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": min(max(options.replicas, options.min_replicas),
                                    options.max_replicas),
            # as many requests as it decodes together: more would queue on the replica
            "target_ongoing_requests": slots,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "look_back_period_s": options.look_back_period_s}}
    else:
        scaling = {"num_replicas": options.replicas}
    router: dict[str, Any] = {}
    if options.routing == "affinity":
        router["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"slots": slots, "max_imbalance": options.max_imbalance})
    replica_name = name_prefix + REPLICA_DEPLOYMENT
    replica = serve.deployment(LLMReplica, name=replica_name).options(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        # a replica holds its slots' requests and as many waiting: a freed slot refills
        # without a round trip; past that requests wait in the ingress's router
        max_ongoing_requests=2 * slots,
        max_queued_requests=options.max_queued_requests,
        graceful_shutdown_timeout_s=server.drain_timeout_s,
        # a stopping replica looks every 0.2 s whether its requests have ended (Ray's default,
        # 2 s, made every delete or downscale wait at least 2 s with nothing running)
        graceful_shutdown_wait_loop_s=0.2,
        health_check_period_s=5.0,
        **scaling, **router)
    ingress = serve.deployment(Gateway, name=name_prefix + INGRESS_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1 << 14,
        graceful_shutdown_timeout_s=server.drain_timeout_s)
    return ingress.bind(
        replica.bind(model, settings.model_dump(mode="json"),
                     server.model_dump(mode="json")),
        replica_name, options.attempts)
