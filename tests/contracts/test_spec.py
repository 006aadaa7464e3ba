"""The training spec is defined once and refused in one voice: the Train RPC, the SDK, the remote
`convserve train` and the offline `python -m convserve.training` all build a TrainConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from convserve.client import Client, ClientError, TrainOptions
from convserve.client.calls import GATE_OPTIONS
from convserve.contracts.errors import ConfigError
from convserve.contracts.spec import REQUEST_SETTINGS, SETTINGS, TrainConfig
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, python_env
from tests.servers import ServerProcess, running_server


def test_every_setting_is_a_config_field_whose_default_passes_its_own_check() -> None:
    assert list(SETTINGS) == [f.name for f in dataclasses.fields(TrainConfig)]
    defaults = TrainConfig()
    for name, setting in SETTINGS.items():
        setting.check(name, getattr(defaults, name))
        assert setting.help, name


def test_the_proto_and_the_sdk_carry_exactly_the_requestable_settings() -> None:
    proto_fields = set(pb.TrainRequest.DESCRIPTOR.fields_by_name)
    assert set(REQUEST_SETTINGS) <= proto_fields
    sdk_options = set(TrainOptions.__annotations__)
    assert sdk_options == {*REQUEST_SETTINGS, *GATE_OPTIONS, "allow_class_change",
                           "idempotency_key"} - {"dataset"}


def test_the_sdk_refuses_a_setting_a_request_cannot_carry() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(ClientError) as refused:
        client.train(device="cuda")  # type: ignore[call-arg]
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown training settings ['device']" in refused.value.details


@pytest.mark.parametrize("value", [True, "3", float("nan"), None])
def test_a_value_of_the_wrong_kind_is_refused_not_coerced(value: object) -> None:
    with pytest.raises(ConfigError, match="epochs=.* is out of range: expected an integer"):
        TrainConfig(epochs=value)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("spec")
    with running_server(root / "store", root / "datasets", "--metrics-port", "-1") as process:
        yield process


BAD = [("lr", 5.0, "--lr", "5"), ("batch_size", 5000, "--batch-size", "5000"),
       ("augment", "rotate", "--augment", "rotate"), ("dataset", "folder:/etc", "--dataset",
                                                      "folder:/etc")]


@pytest.mark.parametrize(("name", "value", "flag", "text"), BAD)
def test_an_out_of_range_value_is_refused_with_the_same_message_everywhere(
        server: ServerProcess, tmp_path: Path, name: str, value: object, flag: str,
        text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**{name: value})
    expected = str(refused.value)

    # The Train RPC, sent raw (the SDK would refuse it before sending).
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as rpc:
        pb_grpc.TrainingStub(channel).Train(pb.TrainRequest(**{name: value}), timeout=30)
    assert (rpc.value.code(), rpc.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)

    # The SDK, before anything is sent.
    with Client(server.address) as client, pytest.raises(ClientError) as sdk:
        client.train(**{name: value})  # type: ignore[arg-type]
    assert (sdk.value.code, sdk.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, expected)

    # The remote CLI and the offline training CLI: one line on stderr, exit 2 for the offline.
    remote = _run([sys.executable, "-m", "convserve.cli", "train", "--address", server.address,
                   flag, text])
    offline = _run([sys.executable, "-m", "convserve.training", flag, text, "--out",
                    str(tmp_path / "run")])
    assert remote.returncode != 0 and expected in remote.stderr
    assert offline.returncode == 2 and expected in offline.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=120, check=False)
