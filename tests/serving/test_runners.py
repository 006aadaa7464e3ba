"""How a session runs a batch: plain run, I/O binding, CUDA graphs with fixed batch buckets.

The runners use ONNX Runtime's device-neutral API, so here they run for real on CPU with
`device="cpu"` against a real exported model: bucketing, padding, chunking, buffer reuse and
thread safety are all exercised. Only the GPU itself cannot exist on this machine: the tests
marked `gpu` load the same model on CUDA (with graph capture) and are skipped, with the reason,
where no CUDA device is present.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from convserve.server import config as config_module
from convserve.server.server import session_settings
from convserve.serving.loader import (
    CPU,
    CUDA,
    TENSORRT,
    SessionSettings,
    available_providers,
    choose_runner,
    load_version,
    provider_options,
)
from convserve.serving.runners import (
    BoundRunner,
    GraphRunner,
    PlainRunner,
    bucket_for,
    buckets_up_to,
    pad_batch,
)
from convserve.store.directory import DirectoryStore
from tests.servers import images, publish


@pytest.fixture(scope="module")
def session(onnx_models) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_models["good"]), options, providers=[CPU])


def names(session: ort.InferenceSession) -> tuple[str, str]:
    return session.get_inputs()[0].name, session.get_outputs()[0].name


def test_buckets_are_powers_of_two_capped_by_the_largest_batch() -> None:
    assert buckets_up_to(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert buckets_up_to(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert buckets_up_to(1) == (1,)


@pytest.mark.parametrize(("count", "bucket"), [(1, 1), (2, 2), (3, 4), (33, 64), (64, 64), (65, None)])
def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch(count: int, bucket: int | None
                                                                   ) -> None:
    assert bucket_for(count, (1, 2, 4, 8, 16, 32, 64)) == bucket


def test_pad_batch_appends_zero_images_and_keeps_a_full_batch_as_is() -> None:
    pixels = images(3, seed=1)
    padded = pad_batch(pixels, 8)
    assert padded.shape == (8, 32, 32, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:3], pixels)
    assert not padded[3:].any()
    assert pad_batch(pixels, 3) is pixels


@pytest.mark.parametrize("count", [1, 3, 4, 7, 8, 19])
def test_graph_runner_matches_a_plain_run_for_every_batch_size(session, count: int) -> None:
    """Padding rows never leak into the result, chunks (19 > largest bucket 8) come back in order."""
    input_name, output_name = names(session)
    plain = PlainRunner(session, input_name, output_name)
    graphs = GraphRunner(session, input_name, output_name, num_classes=10, buckets=(1, 2, 4, 8),
                         device="cpu")
    pixels = images(count, seed=count)
    got = graphs(pixels)
    assert got.shape == (count, 10)
    np.testing.assert_allclose(got, plain(pixels), atol=1e-6)


def test_graph_runner_reuses_each_buckets_buffers(session) -> None:
    """A captured graph replays fixed addresses: a bucket's buffers must be allocated once."""
    input_name, output_name = names(session)
    graphs = GraphRunner(session, input_name, output_name, num_classes=10, buckets=(1, 4),
                         device="cpu")
    first = graphs(images(3, seed=1))
    buffers = graphs._slots[4].inputs.data_ptr(), graphs._slots[4].outputs.data_ptr()
    second = graphs(images(4, seed=2))
    assert (graphs._slots[4].inputs.data_ptr(), graphs._slots[4].outputs.data_ptr()) == buffers
    assert sorted(graphs._slots) == [4]
    assert not np.allclose(first[:3], second[:3])  # new inputs really were copied in


def test_graph_runner_is_safe_under_concurrent_callers(session) -> None:
    input_name, output_name = names(session)
    plain = PlainRunner(session, input_name, output_name)
    graphs = GraphRunner(session, input_name, output_name, num_classes=10, buckets=(1, 2, 4),
                         device="cpu")
    batches = [images(1 + i % 4, seed=100 + i) for i in range(24)]
    expected = [plain(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def call(index: int) -> None:
        results[index] = graphs(batches[index])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, want in enumerate(expected):
        np.testing.assert_allclose(results[index], want, atol=1e-6)


def test_graph_runner_rejects_buckets_that_are_not_increasing(session) -> None:
    input_name, output_name = names(session)
    with pytest.raises(ValueError, match="buckets: expected increasing sizes >= 1"):
        GraphRunner(session, input_name, output_name, 10, buckets=(4, 2), device="cpu")


def test_bound_runner_matches_a_plain_run(session) -> None:
    input_name, output_name = names(session)
    pixels = images(5, seed=9)
    bound = BoundRunner(session, input_name, output_name, device="cpu")
    np.testing.assert_allclose(bound(pixels), PlainRunner(session, input_name, output_name)(pixels),
                               atol=1e-6)


def test_provider_options_carry_the_gpu_settings() -> None:
    settings = SessionSettings(cuda_graphs=True, graph_buckets=(1, 2, 4, 64), tensorrt_fp16=True,
                               tensorrt_cache_dir="/cache/trt")
    options = dict(provider_options([TENSORRT, CUDA, CPU], settings, "pixels"))
    assert options[CUDA]["enable_cuda_graph"] == "1"
    trt = options[TENSORRT]
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == "/cache/trt"
    assert trt["trt_profile_min_shapes"] == "pixels:1x32x32x3"
    assert trt["trt_profile_max_shapes"] == "pixels:64x32x32x3"
    assert options[CPU] == {}

    plain = dict(provider_options([TENSORRT, CUDA], SessionSettings(), "x"))
    assert plain[CUDA]["enable_cuda_graph"] == "0"
    assert plain[TENSORRT]["trt_fp16_enable"] == "False"
    assert "trt_engine_cache_path" not in plain[TENSORRT]


def test_server_flags_reach_the_session_settings() -> None:
    config = config_module.parse(["--cuda-graphs", "true", "--max-batch-size", "48",
                                  "--tensorrt-fp16", "true", "--tensorrt-cache-dir", "/c"], {})
    settings = session_settings(config)
    assert settings.cuda_graphs and settings.tensorrt_fp16 and settings.tensorrt_cache_dir == "/c"
    assert settings.graph_buckets == (1, 2, 4, 8, 16, 32, 48)


def test_settings_reject_unordered_graph_buckets() -> None:
    with pytest.raises(ValueError, match="graph_buckets: expected increasing sizes"):
        SessionSettings(graph_buckets=(8, 8))


def test_a_cpu_session_runs_plainly_even_with_gpu_options_on(onnx_models, tmp_path) -> None:
    """--cuda-graphs on a CPU host: the GPU options are ignored and the model still serves."""
    store = DirectoryStore(tmp_path / "store")
    publish(store, onnx_models["good"])
    model = load_version(store, 1, SessionSettings(providers=("cpu",), cuda_graphs=True,
                                                   intra_op_threads=1))
    assert model.providers == [CPU]
    assert isinstance(choose_runner(model, SessionSettings(cuda_graphs=True)), PlainRunner)
    assert model.predict(images(2)).shape == (2, 10)


# ----------------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(CUDA not in available_providers(),
                                reason="no CUDA device or CUDA-enabled onnxruntime on this host")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_serving_matches_cpu(onnx_models, tmp_path, cuda_graphs: bool) -> None:
    store = DirectoryStore(tmp_path / "store")
    publish(store, onnx_models["good"])
    on_cpu = load_version(store, 1, SessionSettings(providers=("cpu",)))
    on_gpu = load_version(store, 1, SessionSettings(providers=("cuda",), cuda_graphs=cuda_graphs,
                                                    graph_buckets=(1, 2, 4, 8, 16)))
    assert on_gpu.providers[0] == CUDA
    assert isinstance(on_gpu.runner, GraphRunner if cuda_graphs else BoundRunner)
    for count in (1, 3, 16, 40):  # 40 > the largest bucket: chunks
        pixels = images(count, seed=count)
        np.testing.assert_allclose(on_gpu.predict(pixels), on_cpu.predict(pixels), atol=1e-4)
