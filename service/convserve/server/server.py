"""Builds and runs one replica: gRPC services, health, reflection, the model manager and the job
runner, all on one asyncio loop. Tests call `start(config)` with port 0 and talk to the real
server on 127.0.0.1.

Its role (`--role`) says which parts run: `serve` loads the promoted model and answers every
service (a Train is queued in the job store); `train` claims and runs its queued jobs and
answers health, reflection and the Training service only (no model is loaded); `all` both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from convserve.contracts.errors import PortInUse, Unavailable
from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.jobs import JobRunner, RunnerConfig
from convserve.jobs.backend import FILES
from convserve.lifecycle import map_large_blocks_separately
from convserve.metrics import serve_http
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server import auth, open_inference_grpc
from convserve.server.config import (
    HTTP_PREFIX,
    LISTENING_PREFIX,
    METRICS_PREFIX,
    ServerConfig,
    check_port_free,
)
from convserve.server.guard import GuardedRegistration, count_unknown_methods
from convserve.server.open_inference import OpenInference
from convserve.server.open_inference_grpc import OpenInferenceServicer
from convserve.server.servicers import InferenceServicer, ModelsServicer, TrainingServicer
from convserve.server.telemetry import RequestMetrics, replica_registry
from convserve.serving import codec
from convserve.serving.batcher import BatchingConfig, DynamicBatcher
from convserve.serving.loader import SessionSettings
from convserve.serving.manager import ModelManager
from convserve.serving.predictor import Predictor
from convserve.serving.runners import buckets_up_to
from convserve.store.base import ModelStore
from convserve.store.location import open_reachable

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("convserve.server.server")

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name
                      for name in ("Inference", "Training", "Models"))
# Health "service" for liveness probes: SERVING while the process answers, model or not (a
# replica without a model is not ready, but restarting it would not help).
LIVENESS = "liveness"
HEALTH_CHECK_INTERVAL_S = 0.1


@dataclass
class Serving:
    """The parts that answer inference: absent on a replica with the train role."""

    manager: ModelManager
    batcher: DynamicBatcher
    predictor: Predictor
    open_inference: OpenInference
    decode_pool: ThreadPoolExecutor


@dataclass
class Replica:
    """A started server and what runs beside it."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    store: ModelStore
    runner: JobRunner
    health: health.aio.HealthServicer
    serving: Serving | None = None
    trains: bool = False                # this process claims and runs queued jobs
    metrics_server: WSGIServer | None = None
    http: web.AppRunner | None = None   # the Open Inference Protocol over HTTP (--http-port)
    http_url: str | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def manager(self) -> ModelManager:
        assert self.serving is not None, "a replica with the train role loads no model"
        return self.serving.manager

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_server is None:
            return None
        return f"http://{self.config.host}:{self.metrics_server.server_address[1]}/metrics"


def session_settings(config: ServerConfig) -> SessionSettings:
    """ONNX Runtime settings; the loader resolves "auto"/"cpu"/"cuda" to provider names."""
    providers = tuple(p.strip() for p in config.providers.split(",") if p.strip())
    return SessionSettings(
        providers=providers, intra_op_threads=config.intra_op_threads,
        graph_optimization=config.graph_optimization,
        # Spin-waiting threads burn cores while idle: off by default because training children
        # share this host's cores.
        allow_spinning=config.allow_spinning,
        # Warm the sizes the batcher forms, so the first real batches do not pay allocation.
        warmup_batch_sizes=tuple(sorted({1, min(8, config.max_batch_size),
                                         config.max_batch_size})),
        cuda_graphs=config.cuda_graphs, graph_buckets=buckets_up_to(config.max_batch_size),
        tensorrt_fp16=config.tensorrt_fp16, tensorrt_cache_dir=config.tensorrt_cache_dir)


def runner_config(config: ServerConfig) -> RunnerConfig:
    extra: dict[str, Any] = {"python": config.training_python} if config.training_python else {}
    return RunnerConfig(
        datasets_root=config.datasets_root, max_queue=config.max_queued_jobs,
        jobs_url="" if config.jobs_url == FILES else config.jobs_url,
        max_epochs=config.max_epochs,
        gate_defaults=GatePolicy(min_accuracy=config.min_accuracy,
                                 min_improvement=config.min_improvement),
        # The operator's own min_improvement is always allowed, negative included (tolerate a
        # small regression); requests may not go below it or 0, whichever is lower.
        gate_bounds=GateBounds(min_accuracy_floor=config.min_accuracy_floor,
                               min_improvement_floor=min(0.0, config.min_improvement),
                               allow_class_change=config.allow_class_change_requests),
        heartbeat_s=config.job_heartbeat_s, stale_after_s=config.stale_job_after_s,
        progress_interval_s=config.job_progress_interval_s,
        processes=config.training_processes, max_attempts=config.max_job_attempts,
        poll_s=config.poll_interval_s, **extra)


def interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    """The bearer-token check when a token is configured (none otherwise)."""
    token = config.token()
    if not token:
        return []
    protected = auth.OPERATOR_METHODS | (auth.INFERENCE_METHODS if config.auth_inference
                                         else frozenset())
    return [auth.BearerTokenAuth(token, protected)]


async def start(config: ServerConfig, worker: int | None = None) -> Replica:
    """Start a replica (or, with `worker`, worker `worker` of one: its workers share the port,
    and only worker 0 runs jobs). Raises PortInUse (a ConfigError) when the gRPC or metrics port
    is taken."""
    if worker is None:  # workers share the port their parent checked and holds
        check_port_free(config.host, config.port, "gRPC")
    trains = config.role in ("train", "all") and not worker
    store = await asyncio.to_thread(open_reachable, config.store_location())
    if store.location.is_s3 and config.jobs_url == FILES and config.role != "all":
        log.warning("jobs are files in the local work directory %s: replicas see each other's "
                    "jobs only if it is shared; use --jobs-url postgresql://…", store.work.root)
    runner = JobRunner(store, runner_config(config))
    try:  # the schema, once; a replica whose job store is down still starts (and serves)
        await asyncio.to_thread(runner.jobs.ensure_ready)
        if trains:
            recovered = await asyncio.to_thread(runner.recover)
            if recovered:
                log.warning("reclaimed %d jobs whose trainer is gone (see their records): %s",
                            len(recovered), ", ".join(recovered))
    except Unavailable as error:
        log.warning("%s; job calls answer UNAVAILABLE until it is back", error)
    serving = await _start_serving(config, store) if config.role != "train" else None

    requests = RequestMetrics()
    server = grpc.aio.server(interceptors=interceptors(config), options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Only the workers of one replica share a port; a lone server owns it.
        ("grpc.so_reuseport", 1 if worker is not None else 0),
    ])
    health_servicer = _add_services(server, requests, store, runner, serving)
    port = _listen(server, config)
    metrics_server = _serve_metrics(config, replica_registry(requests, runner, serving))
    http, http_url = (await _serve_http(config, serving.open_inference, requests,
                                        shared=worker is not None)
                      if serving is not None else (None, None))
    await server.start()
    replica = Replica(config, server, port, store, runner, health_servicer, serving, trains,
                      metrics_server, http, http_url)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    if serving is not None:
        await _set_health(replica, serving.manager.live_version is not None)
        replica.tasks = [
            asyncio.create_task(serving.batcher.run(replica.stopping), name="batcher"),
            asyncio.create_task(serving.manager.run(replica.stopping), name="model-manager"),
            asyncio.create_task(_follow_health(replica), name="health")]
    else:
        await _set_health(replica, True)  # a trainer is ready once it runs: it needs no model
    if trains:
        replica.tasks += [asyncio.create_task(runner.run(replica.stopping), name="job-runner"),
                          asyncio.create_task(_recover_jobs(replica), name="job-recovery")]
    log.info("%s on %s (role %s, model version %s)", "serving" if serving else "training",
             replica.address, config.role, serving.manager.live_version if serving else "-")
    return replica


async def _start_serving(config: ServerConfig, store: ModelStore) -> Serving:
    """The model manager (the promoted model loaded and warmed), the batcher and the predictor."""
    manager = ModelManager(store, session_settings(config), poll_interval_s=config.poll_interval_s,
                           cache_size=config.model_cache_size)
    await asyncio.to_thread(manager.refresh)  # serve the promoted model from the first call
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
    batcher = DynamicBatcher(manager.current, BatchingConfig(
        max_batch_size=config.max_batch_size, batch_timeout_s=config.batch_timeout_s,
        max_enqueued=config.max_enqueued, max_concurrent_batches=config.max_concurrent_batches,
        inline_max_images=config.inline_max_images))
    limits = codec.Limits(max_images=config.max_images_per_request,
                          max_image_side=config.max_image_side,
                          max_request_pixels=config.max_request_pixels)
    predictor = Predictor(manager, batcher)
    open_inference = OpenInference(config.model_name, store, predictor, limits, decode_pool,
                                   config.batch_timeout_s)
    return Serving(manager, batcher, predictor, open_inference, decode_pool)


def _add_services(server: grpc.aio.Server, requests: RequestMetrics, store: ModelStore,
                  runner: JobRunner, serving: Serving | None) -> health.aio.HealthServicer:
    """Every service this replica's role answers, registered through a guard (an undecodable
    body is INVALID_ARGUMENT); returns the health servicer."""
    ours = GuardedRegistration(server, requests, checked_by_servicer=True)
    others = GuardedRegistration(server, requests, checked_by_servicer=False)
    names = [TrainingServicer.SERVICE]
    pb_grpc.add_TrainingServicer_to_server(TrainingServicer(runner, requests), ours)
    if serving is not None:
        open_inference = serving.open_inference
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(
            serving.manager, store, open_inference.limits, serving.predictor, requests,
            serving.decode_pool), ours)
        pb_grpc.add_ModelsServicer_to_server(ModelsServicer(store, serving.manager, requests),
                                             ours)
        open_inference_grpc.register(ours, OpenInferenceServicer(open_inference, requests))
        names = list(SERVICE_NAMES)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, others)
    # What reflection.enable_server_reflection does for an aio server, through the guard.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME)), others)
    count_unknown_methods(server, requests)
    return health_servicer


def _listen(server: grpc.aio.Server, config: ServerConfig) -> int:
    """The gRPC port (TLS when configured)."""
    listen = f"{config.host}:{config.port}"
    if config.tls_cert_file:
        port = server.add_secure_port(listen, auth.server_credentials(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file))
    else:
        port = server.add_insecure_port(listen)
    return port


async def _serve_http(config: ServerConfig, model: OpenInference, requests: RequestMetrics, *,
                      shared: bool) -> tuple[web.AppRunner | None, str | None]:
    """The Open Inference Protocol over HTTP, or nothing with --http-port -1; `shared`: the
    workers of one replica share its port (SO_REUSEPORT). A taken port is PortInUse."""
    if config.http_port < 0:
        return None, None
    # Imported only when on: aiohttp and its C parts cost a replica ~13 MB of RSS otherwise.
    from aiohttp import web

    from convserve.server import open_inference_http

    app = open_inference_http.build_app(
        model, requests, token=config.token() if config.auth_inference else "",
        max_body_bytes=config.max_message_bytes)
    # access_log off: our own log lines carry the request id.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.grace_period_s)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port, reuse_port=shared,
                       ssl_context=auth.http_ssl_context(config.tls_cert_file, config.tls_key_file,
                                                         config.tls_client_ca_file))
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise PortInUse(f"HTTP port {config.http_port} on {config.host} is not available "
                        f"({reason}); choose another --http-port, or -1 to turn it off") from None
    port = runner.addresses[0][1]
    scheme = "https" if config.tls_cert_file else "http"
    return runner, f"{scheme}://{config.host}:{port}"


def _serve_metrics(config: ServerConfig, registry: CollectorRegistry) -> WSGIServer | None:
    """The /metrics endpoint, or None with --metrics-port -1; a taken port is PortInUse."""
    if config.metrics_port < 0:
        return None
    try:
        return serve_http(registry, config.host, config.metrics_port)
    except OSError as error:
        raise PortInUse(f"metrics port {config.metrics_port} on {config.host} is not "
                        f"available ({error.strerror}); choose another --metrics-port, "
                        "or -1 to turn metrics off") from None


async def stop(replica: Replica, grace_s: float | None = None) -> None:
    """Drain: NOT_SERVING at once, refuse new calls, let calls in flight finish within grace."""
    await replica.health.enter_graceful_shutdown()
    if replica.serving is not None:
        replica.serving.open_inference.draining = True  # its ready answers turn false at once
    # The batcher and manager keep running until the calls in flight have finished. The HTTP
    # port stops accepting at once as well, and waits for its calls (shutdown_timeout: grace).
    http_stopped = replica.http.cleanup() if replica.http is not None else asyncio.sleep(0)
    await asyncio.gather(
        replica.server.stop(replica.config.grace_period_s if grace_s is None else grace_s),
        http_stopped)
    replica.stopping.set()
    for task in replica.tasks:
        task.cancel()
    for task in replica.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if replica.serving is not None:
        replica.serving.decode_pool.shutdown(wait=False, cancel_futures=True)
    if replica.metrics_server is not None:
        await asyncio.to_thread(replica.metrics_server.shutdown)
        replica.metrics_server.server_close()
    await asyncio.to_thread(replica.runner.close)


async def serve(config: ServerConfig, worker: int | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    map_large_blocks_separately()  # before any session is loaded (service/lifecycle.py)
    replica = await start(config, worker)
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    if replica.metrics_url:
        print(f"{METRICS_PREFIX}{replica.metrics_url}", flush=True)
    if replica.http_url:
        print(f"{HTTP_PREFIX}{replica.http_url}", flush=True)
    print(f"{LISTENING_PREFIX}{replica.address}", flush=True)
    await signalled.wait()
    log.info("signal received: draining (grace %.1f s)", config.grace_period_s)
    await stop(replica)


async def _recover_jobs(replica: Replica) -> None:
    """Every trainer keeps looking for jobs whose trainer died (stale heartbeat), not only at
    start-up: such a job goes back to the queue for the trainers that are alive."""
    interval = max(1.0, replica.config.stale_job_after_s / 2)
    while not replica.stopping.is_set():
        await asyncio.sleep(interval)
        try:
            recovered = await asyncio.to_thread(replica.runner.recover)
        except Unavailable as error:  # the trainer's loop logs the outage
            log.debug("job recovery: %s", error)
            continue
        except Exception:  # a broken job file must not stop the loop
            log.exception("job recovery failed")
            continue
        if recovered:
            log.warning("reclaimed %d jobs whose trainer is gone (see their records): %s",
                        len(recovered), ", ".join(recovered))


async def _follow_health(replica: Replica) -> None:
    """SERVING exactly while a model is live (set from the loop, not the manager's thread)."""
    serving = replica.manager.live_version is not None
    while not replica.stopping.is_set():
        live = replica.manager.live_version is not None
        if live != serving:
            serving = live
            await _set_health(replica, live)
        await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)


async def _set_health(replica: Replica, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    names = SERVICE_NAMES if replica.serving is not None else (TrainingServicer.SERVICE,)
    for name in ("", *names):
        await replica.health.set(name, status)
