"""Structured logs: JSON lines with the caller's request id, echoed back; text on a terminal."""

from __future__ import annotations

import io
import json
import logging
import re

import grpc
import pytest

from convserve.client import Client, ClientError
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server import logs
from tests.servers import images, running_server
from tests.waits import wait_until


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_request_id_extras_and_the_traceback(restore_logging) -> None:
    stream = io.StringIO()
    assert logs.configure("INFO", "auto", stream) == "json"  # not a terminal
    token = logs.REQUEST_ID.set("abc-123")
    try:
        logging.getLogger("convserve.test").info("hello %s", "there", extra={"method": "Predict"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("convserve.test").exception("failed")
    finally:
        logs.REQUEST_ID.reset(token)
    logging.getLogger("convserve.test").debug("below the level: not written")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello there" and first["level"] == "INFO"
    assert first["request_id"] == "abc-123" and first["method"] == "Predict"
    assert first["logger"] == "convserve.test" and re.match(r"\d{4}-\d\d-\d\dT", first["time"])
    assert second["level"] == "ERROR" and "ValueError: boom" in second["error"]


def test_a_terminal_gets_text_and_a_bad_format_is_refused(restore_logging) -> None:
    terminal = _Terminal()
    assert logs.configure("INFO", "auto", terminal) == "text"
    logging.getLogger("convserve.test").warning("readable")
    assert re.search(r" WARNING convserve\.test: readable$", terminal.getvalue().strip())
    with pytest.raises(ValueError, match="log_format: expected one of"):
        logs.configure("INFO", "xml", terminal)


def _json_lines(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@pytest.mark.slow
def test_the_server_logs_and_echoes_the_sdks_request_id(store_with_model) -> None:
    store, datasets = store_with_model
    with running_server(store, datasets, "--log-format", "json", "--log-level", "DEBUG") as server:
        with Client(server.address) as client:
            client.predict(images(1))
            ok_id = client.last_request_id
            with pytest.raises(ClientError) as refused:
                client.predict(images(1), version=99)
        assert refused.value.request_id and refused.value.request_id != ok_id
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            _, call = stub.GetModel.with_call(pb.GetModelRequest(), timeout=10,
                                              metadata=(("x-request-id", "caller-7"),))
            assert dict(call.trailing_metadata())["x-request-id"] == "caller-7"
            _, call = stub.GetModel.with_call(pb.GetModelRequest(), timeout=10,
                                              metadata=(("x-request-id", "no spaces allowed"),))
            assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])
        expected = {(ok_id, "Predict", "OK"), (refused.value.request_id, "Predict", "NOT_FOUND"),
                    ("caller-7", "GetModel", "OK")}

        def logged_calls() -> set[tuple]:
            return {(e.get("request_id"), e.get("method"), e.get("code"))
                    for e in _json_lines(server.stderr_lines) if "method" in e}

        # The log reaches stderr_lines through a reader thread: wait for the lines, not a time.
        wait_until(lambda: expected <= logged_calls(), "the three calls' log lines")
