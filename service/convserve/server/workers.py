"""`convserve serve --workers N`: N serving processes of one replica share its gRPC port.

One Python event loop answers about 3,000 requests/s whatever the host, so a many-core or GPU
host needs more than one. The parent does no serving itself; it

1. refuses a port another process holds (one line, exit 2), and for port 0 picks one;
2. holds the port with SO_REUSEPORT and starts N workers (`python -m convserve.server.workers`), fresh
   interpreters that each open their own ONNX Runtime session and batcher and bind the same port
   with SO_REUSEPORT: the kernel spreads connections over them;
3. prints each worker's metrics line and then one listening line, once every worker listens;
4. on SIGTERM or SIGINT, passes it on: every worker drains (health NOT_SERVING, new calls
   refused, calls in flight finish within the grace period) and the parent exits 0 when they
   all did. A worker that dies on its own takes the replica down (exit 1), so the orchestrator
   restarts it whole; a worker whose parent dies gets SIGTERM from the kernel.

Jobs: with role all, worker 0 also claims and runs queued jobs, one at a time as a single
process would; any worker queues a Train and answers for any job, since jobs live in the job store.
Metrics: worker i serves /metrics on metrics_port + i (0 stays "any free port"; -1 off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys

from convserve.lifecycle import PARENT_PID_ENV, die_with_parent
from convserve.server.config import (
    HTTP_PREFIX,
    LISTENING_PREFIX,
    METRICS_PREFIX,
    ServerConfig,
    check_port_free,
)

log = logging.getLogger("convserve.server.workers")

STOP_MARGIN_S = 30.0  # beyond the grace period, before a worker that will not stop is killed


async def serve_workers(config: ServerConfig) -> int:
    """Run `config.workers` workers until a signal; the exit code for `convserve serve`."""
    check_port_free(config.host, config.port, "gRPC")
    for index in range(config.workers):
        if config.metrics_port > 0:
            check_port_free(config.host, config.metrics_port + index, "metrics")
    with _hold_port(config.host, config.port) as port:
        workers = [await _spawn(worker_config(config, port, index), index)
                   for index in range(config.workers)]
        try:
            ready = await asyncio.gather(*(_wait_ready(w) for w in workers))
        except RuntimeError as error:
            log.error("%s", error)
            await _stop_all(workers, config.grace_period_s)
            return 1
        for metrics_lines, _ in ready:
            for line in metrics_lines:
                print(line, flush=True)
        print(f"{LISTENING_PREFIX}{config.host}:{port}", flush=True)
        log.info("%d workers serving on %s:%d", len(workers), config.host, port)
        return await _supervise(workers, config.grace_period_s)


@contextlib.contextmanager
def _hold_port(host: str, port: int):  # type: ignore[no-untyped-def]
    """A bound (not listening) SO_REUSEPORT socket on the port: it reserves a port-0 choice for
    the workers and never receives a connection itself."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
        yield holder.getsockname()[1]


def worker_config(config: ServerConfig, port: int, index: int) -> ServerConfig:
    metrics = config.metrics_port + index if config.metrics_port > 0 else config.metrics_port
    # ORT's default is one intra-op thread per core in *each* session: N workers would run
    # N x cores threads. Unless set, each worker gets its share of the cores.
    threads = config.intra_op_threads or max(1, (os.cpu_count() or 1) // config.workers)
    return dataclasses.replace(config, port=port, metrics_port=metrics, workers=1,
                               intra_op_threads=threads)


async def _spawn(config: ServerConfig, index: int) -> asyncio.subprocess.Process:
    # The configuration goes through the environment, not argv: it may hold the token.
    env = {**os.environ, "CONVSERVE_WORKER_CONFIG": config.to_json(),
           PARENT_PID_ENV: str(os.getpid())}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "convserve.server.workers", "--index", str(index),
        stdout=asyncio.subprocess.PIPE, env=env)


async def _wait_ready(worker: asyncio.subprocess.Process) -> tuple[list[str], str]:
    """The worker's metrics lines and its listening line; RuntimeError if it exits first."""
    assert worker.stdout is not None
    metrics = []
    while line := (await worker.stdout.readline()).decode():
        if line.startswith((METRICS_PREFIX, HTTP_PREFIX)):  # the parent repeats them
            metrics.append(line.strip())
        elif line.startswith(LISTENING_PREFIX):
            return metrics, line.strip()
    code = await worker.wait()
    raise RuntimeError(f"worker {worker.pid} exited with code {code} before it listened")


async def _supervise(workers: list[asyncio.subprocess.Process], grace_s: float) -> int:
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    exits = [asyncio.ensure_future(w.wait()) for w in workers]
    signal_wait = asyncio.ensure_future(signalled.wait())
    await asyncio.wait([signal_wait, *exits], return_when=asyncio.FIRST_COMPLETED)
    if not signalled.is_set():
        dead = [w.pid for w in workers if w.returncode is not None]
        log.error("worker %s exited on its own: stopping the replica", dead)
    signal_wait.cancel()
    codes = await _stop_all(workers, grace_s)
    return 0 if signalled.is_set() and all(code == 0 for code in codes) else 1


async def _stop_all(workers: list[asyncio.subprocess.Process], grace_s: float) -> list[int]:
    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)),
                                           timeout=grace_s + STOP_MARGIN_S))
    except TimeoutError:
        for worker in workers:
            if worker.returncode is None:
                log.error("worker %d did not stop: SIGKILL", worker.pid)
                worker.kill()
        return list(await asyncio.gather(*(w.wait() for w in workers)))


def main(argv: list[str] | None = None) -> int:
    """A worker: `python -m convserve.server.workers --index I`, started by the parent with its
    configuration in $CONVSERVE_WORKER_CONFIG."""
    from convserve.server import logs, server

    parser = argparse.ArgumentParser(prog="convserve worker")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent()  # SIGTERM drains this worker if the parent dies, even by SIGKILL
    config = ServerConfig.from_json(os.environ.pop("CONVSERVE_WORKER_CONFIG"))
    logs.configure(config.log_level, config.log_format)
    asyncio.run(server.serve(config, args.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
