"""What the suite's third-party servers (tests/postgres.py, tests/s3.py) share as child
processes of pytest: dying with it, showing their log when they fail, and how they start (on other
ports when theirs were taken), stop, die and restart."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, TypeVar

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """In a server's process before exec: SIGKILL it when this process dies, even by SIGKILL
    (when neither fixture finalizers nor atexit run). Linux ties this to the starting thread:
    start servers from a thread that outlives them."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def log_tail(path: Path, chars: int = 4000, offset: int = 0) -> str:
    """The end of a server's log (at most `chars`, from `offset` on)."""
    try:
        with path.open("rb") as log:
            log.seek(max(offset, path.stat().st_size - chars))
            return log.read().decode(errors="replace")
    except OSError as error:
        return f"(no log: {error})"


class ChildServer:
    """A server run as this process's child, over a directory of its own: start() (with `with
    server:` or `started`), stop(), kill(), restart() and close(). Its log (every run, appended) is
    `log_path`.

    Once started, its port(s) stay the same across stop() and start(), so clients reconnect to the
    same address. A subclass says how to run it: `_spawn()` starts `process`, `_readiness_probe()`
    tells when it serves, `_pick_new_ports()` moves it before its first start, `_forget()` drops a
    process that is gone; `close()` stops it and removes its files."""

    error: ClassVar[type[Exception]]  # what start() raises; the message ends with the log's tail
    program: ClassVar[str]  # the server's name in messages
    readiness: ClassVar[str]  # what ready means, in "<program> did not <readiness> <where>"
    port_taken_markers: ClassVar[tuple[str, ...]]  # what the log says when a port was taken
    start_timeout: ClassVar[float]  # start()'s and restart()'s default, in seconds
    stop_timeout: ClassVar[float]  # stop()'s default, in seconds
    stop_signal: ClassVar[signal.Signals]  # what stop() sends first

    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _started = False  # once started, the port(s) are fixed: start() again keeps them

    @property
    def where(self) -> str:
        """Where it listens, in messages: "on port 5432", "at http://127.0.0.1:8333"."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float | None = None) -> None:
        """Start the server and return once it is ready (see the subclass's _readiness_probe()).
        Raises `error`, with the log's tail, when it exits or `timeout` seconds (default
        `start_timeout`) pass first."""
        if self.running:
            raise self.error(f"already running {self.where}")
        timeout = self.start_timeout if timeout is None else timeout
        for _ in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                self._wait_ready(timeout)
            except self.error:
                # A free port was taken between picking and binding it: pick others, unless
                # clients already hold this server's address.
                log = log_tail(self.log_path, offset=offset)
                taken = any(marker in log for marker in self.port_taken_markers)
                if not taken or self._started:
                    raise
                self._pick_new_ports()
                continue
            self._started = True
            return
        raise self.error(f"no free port found:\n{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> None:
        """`stop_signal`, waited for; a server that does not exit within `timeout` seconds
        (default `stop_timeout`) is killed."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server, as a crash or the OOM killer would (see _kill())."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._kill(self.process)
        self._forget()

    def restart(self, timeout: float | None = None) -> None:
        """Stop the server if it runs, then start it again on the same port(s) and data
        directory."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        raise NotImplementedError

    def log_tail(self, chars: int = 4000) -> str:
        return log_tail(self.log_path, chars)

    def __enter__(self: Server) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self) -> None:
        """Start the server's process as `process`, its output appended to `log_path`."""
        raise NotImplementedError

    def _readiness_probe(self) -> Callable[[], object]:
        """A check to call while the server starts: None once it is ready, else why not yet (an
        error or a sentence)."""
        raise NotImplementedError

    def _pick_new_ports(self) -> None:
        """Free port(s) in place of those taken, before the first start."""
        raise NotImplementedError

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the running `process` and wait for it to exit."""
        process.kill()
        process.wait()

    def _forget(self) -> None:
        """Drop `process`, which has exited."""
        raise NotImplementedError

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        not_ready = self._readiness_probe()
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._forget()
                raise self.error(f"{self.program} exited with {code} while starting {self.where}:\n"
                                 f"{self.log_tail()}")
            last = not_ready()
            if last is None:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise self.error(f"{self.program} did not {self.readiness} {self.where} within "
                                 f"{timeout:.0f} s ({last}):\n{self.log_tail()}")
            time.sleep(0.05)


Server = TypeVar("Server", bound=ChildServer)


def started(server: Server) -> Iterator[Server]:
    """A fixture's body: the server started, then closed after the test whatever happened."""
    try:
        server.start()
        yield server
    finally:
        server.close()
