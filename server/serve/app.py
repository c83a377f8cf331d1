"""The Ray Serve application: the ingress deployment, the app builder, and ``adapter-server --ray``.

* :class:`Ingress`: the single server's FastAPI app (``create_app``, same routes, auth, errors,
  /health) over a :class:`~server.serve.client.RayEngineClient`, plus the replica header
  middleware (:mod:`server.serve.trace`).
* :func:`build_app`: ``Ingress`` bound to ``EngineReplica`` x N, with resources and
  ``max_ongoing_requests`` (max_batch + max_waiting, the engine's own bound, so Serve's router
  does not queue what the engine would admit and affinity is not broken by a low cap).
* :func:`run`: what ``adapter-server --ray`` does: join ``--ray-address`` or start a local cluster,
  start Serve's HTTP proxy on --host/--port and run the app until interrupted.
* :func:`app_builder`: for ``serve run server.serve.app:app_builder flags="--model ... --replicas 2"``
  (or a Serve config file naming it, see docs/DEPLOY.md).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass

from ray import serve

from server.config import EngineConfig, ServerConfig
from server.serve.replica import EngineReplica

log = logging.getLogger(__name__)

APP_NAME = "adapter-server"


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    address: str | None = None        # an existing cluster ("auto", "ray://host:10001", ...); None: start one
    replica_cpus: float = 1.0         # CPUs reserved per engine replica (= its torch threads, at least 1)
    replica_gpus: float | None = None  # GPUs per engine replica; None: 1 when CUDA is visible here, else 0
    num_cpus: int | None = None       # CPUs of a locally started cluster (default: all)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP entry point; stateless apart from metrics, so it may have several replicas."""

    def __init__(self, engine_handle, engine_config: EngineConfig, server_config: ServerConfig, replicas: int):
        from server.serve.client import RayEngineClient

        self.server_config = server_config
        self.client = RayEngineClient(engine_config, engine_handle, replicas=replicas,
                                      max_adapter_labels=server_config.max_adapter_labels)
        context = serve.get_replica_context()
        self.label = f"{context.deployment}#{context.replica_id.unique_id}"

    def __serve_build_asgi_app__(self):
        from server.api.app import create_app
        from server.serve.trace import ReplicaHeaderMiddleware

        app = create_app(self.client, self.server_config)
        app.add_middleware(ReplicaHeaderMiddleware, fallback=self.label, wait_timeout=self.server_config.request_timeout)
        return app


def build_app(engine_config: EngineConfig, server_config: ServerConfig, options: RayOptions):
    """The bound application (pass to ``serve.run``)."""
    gpus = options.replica_gpus
    if gpus is None:
        gpus = 1.0 if engine_config.device != "cpu" and _cuda_here() else 0.0
    threads = max(1, int(options.replica_cpus))
    engine = EngineReplica.options(
        num_replicas=options.replicas,
        max_ongoing_requests=engine_config.max_batch + engine_config.max_waiting,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": gpus},
        health_check_period_s=5,
        logging_config={"enable_access_log": False},  # one line per call: the ingress logs each HTTP request
    ).bind(engine_config, threads, server_config.max_adapter_labels)
    return Ingress.options(
        max_ongoing_requests=max(1000, options.replicas * (engine_config.max_batch + engine_config.max_waiting)),
        ray_actor_options={"num_cpus": 0},
    ).bind(engine, engine_config, server_config, options.replicas)


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def start_cluster(options: RayOptions, server_config: ServerConfig, **init_kwargs) -> None:
    """Connect to (or start) Ray and start Serve's HTTP proxy on the server's host and port."""
    import ray

    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address, **init_kwargs)
        else:
            ray.init(num_cpus=options.num_cpus, include_dashboard=False, **init_kwargs)
    serve.start(http_options={"host": server_config.host, "port": server_config.port})


def run(engine_config: EngineConfig, server_config: ServerConfig, options: RayOptions) -> None:
    """``adapter-server --ray``: deploy and serve until SIGINT or SIGTERM, then tear down what it started."""
    import ray

    signal.signal(signal.SIGTERM, _interrupt)
    start_cluster(options, server_config)
    try:
        serve.run(build_app(engine_config, server_config, options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d with %d engine replica(s)", server_config.host, server_config.port,
                 options.replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if options.address:  # a shared cluster: remove only this app
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def app_builder(args: dict):
    """``serve run`` entry point: ``flags`` holds adapter-server's command line (``--replicas N`` included)."""
    from server.cli import parse_args, parse_ray_flags

    argv = shlex.split(args.get("flags", os.environ.get("ADAPTER_SERVER_FLAGS", "")))
    engine_config, server_config = parse_args(argv)
    return build_app(engine_config, server_config, parse_ray_flags(argv, require_flag=False))
