"""The server's one typed configuration, from command-line flags and CONVSERVE_* variables.

A flag wins over its environment variable, which wins over the default. Every field is listed
with its type and default in `FIELDS`, so `--help`, the environment names and the start-up print
all come from one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convserve.contracts.errors import ConfigError, PortInUse
from convserve.jobs.backend import FILES, POSTGRESQL_SCHEMES, redact
from convserve.store.location import StoreLocation, location_of

ENV_PREFIX = "CONVSERVE_"
# The one stdout line a replica prints once it accepts calls; launchers read the address from it.
LISTENING_PREFIX = "convserve listening on "
METRICS_PREFIX = "convserve metrics on "  # printed just before it when the metrics port is on
HTTP_PREFIX = "convserve http on "  # likewise, for the Open Inference Protocol's HTTP port


SECRETS = frozenset({"auth_token"})
ROLES = ("serve", "train", "all")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _setting(default: Any, help: str) -> Any:
    """A field whose help sentence is the flag's `--help` (the one place a setting is described)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    role: str = _setting("all", "serve: answer every RPC and queue Train jobs in the job store; "
                         "train: run the job store's queued jobs; all: both")
    store: str = _setting("store", "the model store: a directory (one machine or a shared "
                          "volume) or s3://bucket/prefix (credentials from the AWS settings)")
    s3_endpoint_url: str = _setting("", "an S3-compatible server's URL for an s3:// store "
                                    "(empty: AWS, or AWS_ENDPOINT_URL)")
    work_dir: str = _setting("", "local folder for job directories and downloaded versions "
                             "(empty: the store's directory; convserve-work for s3://)")
    jobs_url: str = _setting("files", "the job store: files (in the model store's directory; one "
                             "machine or a shared volume) or postgresql://user:password@host/db "
                             "(replicas on many machines; logged without its password)")
    datasets_root: Path = _setting(Path("datasets"), "folder that Train's dataset names resolve in")
    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _setting(50051, "gRPC port, convserve.v1 and the Open Inference Protocol "
                         "(0: any free port)")
    workers: int = _setting(1, "serving processes sharing the port (SO_REUSEPORT); jobs run on "
                            "worker 0 (role all)")
    metrics_port: int = _setting(9090, "Prometheus GET /metrics (0: any free port, -1: off)")
    http_port: int = _setting(-1, "the Open Inference Protocol (KServe v2) over HTTP (0: any "
                              "free port, -1: off; the container image uses 8000)")
    model_name: str = _setting("convserve", "the model's name in the Open Inference Protocol")
    poll_interval_s: float = _setting(0.5, "seconds between reads of the promoted pointer (and, "
                                      "on an idle trainer, of the job queue)")
    model_cache_size: int = _setting(4, "pinned versions kept loaded (LRU)")
    max_images_per_request: int = _setting(1024, "images one request may carry")
    max_image_side: int = _setting(4096, "encoded images: largest width and height, each")
    max_request_pixels: int = _setting(4 * 4096 * 4096, "encoded images: decoded pixels one "
                                       "request may need")
    decode_threads: int = _setting(2, "threads that decode encoded images, off the event loop")
    max_message_bytes: int = _setting(64 << 20, "largest gRPC message and HTTP body, in bytes")
    max_batch_size: int = _setting(256, "images per ONNX Runtime call (dynamic batching)")
    batch_timeout_s: float = _setting(0.0, "seconds a batch waits for more requests once it "
                                      "has one (0: none)")
    max_enqueued: int = _setting(4096, "images waiting for a batch before RESOURCE_EXHAUSTED")
    max_concurrent_batches: int = _setting(1, "ONNX Runtime calls in flight at once (Triton's "
                                           "instance count)")
    inline_max_images: int = _setting(8, "idle fast path: a request this small runs at once on "
                                      "the loop (0: off)")
    allow_spinning: bool = _setting(False, "let ONNX Runtime's threads spin-wait (off: training "
                                    "shares the cores)")
    graph_optimization: str = _setting("all", "ONNX Runtime graph optimisation: disable, basic, "
                                       "extended or all")
    max_queued_jobs: int = _setting(8, "training jobs the job store's queue holds before a Train "
                                    "is RESOURCE_EXHAUSTED")
    max_job_attempts: int = _setting(3, "a job whose trainer dies goes back to the queue; after "
                                     "this many such runs it is FAILED")
    max_epochs: int = _setting(200, "most epochs a Train request may ask for")
    min_accuracy: float = _setting(0.5, "gate: lowest validation accuracy to promote (a request "
                                   "may raise it)")
    min_accuracy_floor: float = _setting(0.0, "gate: lowest min_accuracy a request may ask for")
    min_improvement: float = _setting(0.0, "gate: accuracy a candidate must gain over the "
                                      "champion (0: ties promote, regressions never)")
    allow_class_change_requests: bool = _setting(True, "gate: may a request let a candidate "
                                                 "with other classes replace the champion")
    providers: str = _setting("auto", "ONNX Runtime providers in order: auto, cpu, cuda, "
                              "tensorrt, comma-separated")
    intra_op_threads: int = _setting(0, "ONNX Runtime intra-op threads (0: its default, or "
                                     "cores / workers)")
    cuda_graphs: bool = _setting(False, "CUDA provider: replay one captured graph per batch "
                                 "bucket")
    tensorrt_fp16: bool = _setting(False, "TensorRT provider: fp16 kernels")
    tensorrt_cache_dir: str = _setting("", "TensorRT provider: engine cache folder (empty: "
                                       "rebuild at every load)")
    training_python: str = _setting("", "interpreter for training jobs (empty: this one)")
    training_processes: int = _setting(1, "processes per job; > 1: data-parallel under "
                                       "torchrun, one per GPU")
    job_heartbeat_s: float = _setting(2.0, "seconds between a running job's heartbeats")
    job_progress_interval_s: float = _setting(1.0, "a job's progress events: at most one per "
                                              "this many seconds")
    stale_job_after_s: float = _setting(20.0, "a job without a heartbeat this long belongs to a "
                                        "replica that died")
    grace_period_s: float = _setting(10.0, "seconds calls in flight may finish after SIGTERM")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("auto", "json (one object per line), text, or auto: text on a "
                               "terminal")
    # Access control (service/server/auth.py). Prefer auth_token_file to the value itself.
    auth_token: str = _setting("", "bearer token that Train, CancelJob and Promote need "
                               "(logged as <redacted>)")
    auth_token_file: str = _setting("", "file holding the bearer token")
    auth_inference: bool = _setting(False, "the token also guards Predict, GetModel, ListModels "
                                    "and the Open Inference Protocol's model calls")
    tls_cert_file: str = _setting("", "TLS certificate (PEM): serve TLS instead of plaintext")
    tls_key_file: str = _setting("", "TLS private key (PEM)")
    tls_client_ca_file: str = _setting("", "also require client certificates signed by this "
                                       "CA (PEM)")

    def __post_init__(self) -> None:
        _check(self.role in ROLES, "role", self.role, "serve, train or all")
        object.__setattr__(self, "store", os.fspath(self.store))  # a Path given in code, too
        self.store_location()  # a malformed store URL is a ConfigError before anything starts
        _check(0 <= self.port <= 65535, "port", self.port, "0..65535")
        _check(1 <= self.workers <= 64, "workers", self.workers, "1..64")
        _check(-1 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port,
               "-1 (off) or 0..65535")
        _check(-1 <= self.http_port <= 65535, "http_port", self.http_port, "-1 (off) or 0..65535")
        _check(bool(_MODEL_NAME_RE.fullmatch(self.model_name)), "model_name", self.model_name,
               "1-64 characters of [A-Za-z0-9_.-]")
        _check(0.05 <= self.poll_interval_s <= 60, "poll_interval_s", self.poll_interval_s, "0.05..60")
        _check(self.model_cache_size >= 1, "model_cache_size", self.model_cache_size, ">= 1")
        _check(1 <= self.max_images_per_request <= 65536, "max_images_per_request",
               self.max_images_per_request, "1..65536")
        _check(32 <= self.max_image_side <= 65535, "max_image_side", self.max_image_side,
               "32..65535")
        _check(1024 <= self.max_request_pixels <= 1 << 32, "max_request_pixels",
               self.max_request_pixels, "1024..4294967296")
        _check(1 <= self.decode_threads <= 64, "decode_threads", self.decode_threads, "1..64")
        _check(1 << 20 <= self.max_message_bytes <= 1 << 30, "max_message_bytes",
               self.max_message_bytes, "1 MiB..1 GiB")
        _check(1 <= self.max_batch_size <= 65536, "max_batch_size", self.max_batch_size,
               "1..65536")
        _check(0.0 <= self.batch_timeout_s <= 1.0, "batch_timeout_s", self.batch_timeout_s, "0..1")
        _check(self.max_enqueued >= 1, "max_enqueued", self.max_enqueued, ">= 1")
        _check(1 <= self.max_concurrent_batches <= 64, "max_concurrent_batches",
               self.max_concurrent_batches, "1..64")
        _check(0 <= self.inline_max_images <= 64, "inline_max_images", self.inline_max_images,
               "0 (off)..64")
        _check(self.graph_optimization in ("disable", "basic", "extended", "all"),
               "graph_optimization", self.graph_optimization, "disable, basic, extended or all")
        self._check_training()
        _check(self.intra_op_threads >= 0, "intra_op_threads", self.intra_op_threads, ">= 0")
        _check(0.0 <= self.job_progress_interval_s <= 60, "job_progress_interval_s",
               self.job_progress_interval_s, "0..60")
        _check(1 <= self.training_processes <= 64, "training_processes", self.training_processes,
               "1..64")
        _check(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
               self.log_level, "DEBUG, INFO, WARNING or ERROR")
        _check(self.log_format in ("auto", "json", "text"), "log_format", self.log_format,
               "auto, json or text")
        _check(not (self.auth_token and self.auth_token_file), "auth_token", "<redacted>",
               "either auth_token or auth_token_file, not both")
        for name in ("auth_token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            _check(not path or Path(path).is_file(), name, path, "a readable file")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_cert_file",
               self.tls_cert_file, "set together with tls_key_file")
        _check(not self.tls_client_ca_file or bool(self.tls_cert_file), "tls_client_ca_file",
               self.tls_client_ca_file, "only with tls_cert_file and tls_key_file")
        _check(not self.auth_inference or bool(self.auth_token or self.auth_token_file),
               "auth_inference", self.auth_inference, "only with a token")

    def _check_training(self) -> None:
        """The job queue's, the trainer's and the gate's settings."""
        _check(self.jobs_url == FILES or self.jobs_url.startswith(POSTGRESQL_SCHEMES), "jobs_url",
               redact(self.jobs_url), f"{FILES} or a URL starting with "
               f"{' or '.join(POSTGRESQL_SCHEMES)}")
        _check(self.max_queued_jobs >= 1, "max_queued_jobs", self.max_queued_jobs, ">= 1")
        _check(1 <= self.max_job_attempts <= 100, "max_job_attempts", self.max_job_attempts,
               "1..100")
        _check(self.workers == 1 or self.role != "train", "workers", self.workers,
               "1 with role train (workers serve; one trainer runs one job at a time)")
        _check(self.max_epochs >= 1, "max_epochs", self.max_epochs, ">= 1")
        for name in ("min_accuracy", "min_accuracy_floor"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "0..1")
        _check(-1.0 <= self.min_improvement <= 1.0, "min_improvement", self.min_improvement,
               "-1..1")
        _check(self.min_accuracy >= self.min_accuracy_floor, "min_accuracy", self.min_accuracy,
               f">= min_accuracy_floor ({self.min_accuracy_floor})")

    def describe(self) -> str:
        """One line per setting, for the start-up log; secrets are redacted."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRETS and value:
                value = "<redacted>"
            elif field.name == "jobs_url":
                value = redact(value)
            lines.append(f"  {field.name} = {value}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """Every setting as JSON (secrets included: for a worker process, never for a log)."""
        return json.dumps({f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
                           for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        values = json.loads(text)
        fields: dict[str, Any] = {f.name: Path(values[f.name]) if f.type in ("Path", Path)
                                  else values[f.name]
                                  for f in dataclasses.fields(cls) if f.name in values}
        return cls(**fields)

    def store_location(self) -> StoreLocation:
        return location_of(self.store, s3_endpoint_url=self.s3_endpoint_url,
                           work_dir=self.work_dir)

    def token(self) -> str:
        """The bearer token: the value, or the first line of the file ("" = no access control)."""
        if self.auth_token_file:
            return Path(self.auth_token_file).read_text().strip()
        return self.auth_token


FIELDS = tuple(dataclasses.fields(ServerConfig))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag-name` per setting; the default is None so that env/defaults fill the gaps."""
    for field in FIELDS:
        env = ENV_PREFIX + field.name.upper()
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        text = f"{field.metadata['help']} (env {env}, default {default})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, default=None, type=_parse_bool, metavar="true|false",
                                help=text)
        else:
            parser.add_argument(flag, default=None, help=text)


def from_sources(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None
                 ) -> ServerConfig:
    """Flags, then CONVSERVE_* variables, then defaults; raises ConfigError on a bad value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in FIELDS:
        raw = getattr(args, field.name, None) if args is not None else None
        source = "--" + field.name.replace("_", "-")
        if raw is None:
            raw = environ.get(ENV_PREFIX + field.name.upper())
            source = ENV_PREFIX + field.name.upper()
        if raw is None:
            continue
        values[field.name] = _convert(field, raw, source)
    try:
        return ServerConfig(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return from_sources(parser.parse_args(argv), environ)


def _convert(field: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if not isinstance(raw, str):
        return raw
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _parse_bool(raw)
        if kind == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {kind}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port another process listens on, before any server binds it: gRPC's own
    SO_REUSEPORT would otherwise let a second server start silently and take half the
    connections of the first. Port 0 (any free port) always passes."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ConfigError(f"host={host!r} cannot be resolved: {error}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind(address)
        except OSError as error:
            raise PortInUse(f"{what} port {port} on {host} is already in use ({error.strerror}); "
                            f"stop the other server or choose another port") from None


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is out of range: expected {expected}")
