"""The server's typed configuration: flags over CONVSERVE_* variables over defaults, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from convserve.contracts.errors import ConfigError
from convserve.server import config


def test_a_flag_wins_over_its_environment_variable_which_wins_over_the_default() -> None:
    environ = {"CONVSERVE_MAX_BATCH_SIZE": "32", "CONVSERVE_PORT": "6000",
               "CONVSERVE_CUDA_GRAPHS": "yes"}
    parsed = config.parse(["--port", "7000"], environ)
    assert parsed.port == 7000 and parsed.max_batch_size == 32 and parsed.cuda_graphs is True
    assert parsed.store == "store" and parsed.max_concurrent_batches == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-concurrent-batches", "0"], "max_concurrent_batches=0 is out of range: expected 1..64"),
    (["--max-batch-size", "0"], "max_batch_size=0 is out of range"),
    (["--batch-timeout-s", "2"], "batch_timeout_s=2.0 is out of range: expected 0..1"),
    (["--port", "many"], "--port='many' is not a valid int"),
    (["--job-progress-interval-s", "-1"], "job_progress_interval_s=-1.0 is out of range: expected 0..60"),
    (["--role", "trainer"], "role='trainer' is out of range: expected serve, train or all"),
    (["--role", "train", "--workers", "2"], "workers=2 is out of range: expected 1 with role train"),
    (["--max-job-attempts", "0"], "max_job_attempts=0 is out of range: expected 1..100"),
])
def test_an_invalid_value_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse(argv, {})


def test_an_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CONVSERVE_CUDA_GRAPHS='maybe' is not a valid bool"):
        config.parse([], {"CONVSERVE_CUDA_GRAPHS": "maybe"})


def test_clients_default_to_the_configured_address_then_the_local_port() -> None:
    from convserve.cli.remote import default_address

    assert default_address({}) == "127.0.0.1:50051"
    assert default_address({"CONVSERVE_PORT": "6000"}) == "127.0.0.1:6000"
    assert default_address({"CONVSERVE_ADDRESS": "lb:443", "CONVSERVE_PORT": "6000"}) == "lb:443"


def test_serve_refuses_a_bad_value_with_one_line_and_exit_code_2(repo_root) -> None:
    import subprocess
    import sys

    from tests.conftest import python_env

    result = subprocess.run([sys.executable, "-m", "convserve.cli", "serve", "--metrics-port", "-5"],
                            cwd=repo_root, env=python_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("convserve serve: error: metrics_port=-5 is out of range: "
                                     "expected -1 (off) or 0..65535")


def test_an_operators_negative_min_improvement_is_accepted_for_its_own_jobs(tmp_path: Path
                                                                             ) -> None:
    from convserve.contracts.errors import InvalidInput
    from convserve.jobs import JobRunner, TrainParams
    from convserve.server.server import runner_config
    from convserve.store.directory import DirectoryStore

    settings = config.parse(["--min-improvement", "-0.02", "--store", str(tmp_path / "s")])
    runner = JobRunner(DirectoryStore(settings.store), runner_config(settings))
    policy = runner.validate(TrainParams())  # the server's own default: accepted
    assert policy.min_improvement == -0.02
    assert runner.validate(TrainParams(gate={"min_improvement": 0.01})).min_improvement == 0.01
    with pytest.raises(InvalidInput, match="below this server.s floor -0.02"):
        runner.validate(TrainParams(gate={"min_improvement": -0.5}))
