"""benchmarks/serve.py's servers under test: the store they serve, how each variant is launched,
and what they spent (ORT calls from /metrics; CPU time and memory from /proc, Linux only)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from convserve.cli.launch import LaunchedServer, launch, serve_command
from convserve.contracts.model_card import GateDecision

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().with_name("serve.py")  # its --worker and --floor-server modes


@dataclass(frozen=True)
class Variant:
    """A server to measure: a label, the checkout it runs from, its extra flags."""

    label: str
    cwd: Path
    args: list[str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`LABEL@CHECKOUT[:FLAG,FLAG...]`, e.g. `workers=2@.:--workers=2` or `old@/tmp/base`."""
        label, at, rest = text.partition("@")
        where, _, flags = rest.partition(":")
        if not label or not at or not where:
            raise SystemExit(f"--variant {text!r}: expected LABEL@CHECKOUT[:FLAG,FLAG...]")
        return cls(label, Path(where).resolve(), [f for f in flags.split(",") if f])


def make_store(root: Path) -> Path:
    """A store under `root` with the (untrained) ConvNet published and promoted as version 1."""
    from convserve.store.directory import DirectoryStore
    from convserve.training.export import export_onnx, serving_model
    from convserve.training.model import ConvNet, Preprocess

    model = export_onnx(serving_model(ConvNet(10), Preprocess([0.5] * 3, [0.25] * 3)),
                        root / "candidate" / "model.onnx",
                        {"classes": [str(i) for i in range(10)]})
    store = DirectoryStore(root / "store")
    store.publish(model, {"classes": [str(i) for i in range(10)]},
                  lambda _: GateDecision(True, ("benchmark",)), actor="benchmark")
    return store.root


def start_convserve(store: Path, extra: list[str], checkout: Path = REPO) -> LaunchedServer:
    """`convserve serve` on `store` with the benchmark's flags, running `checkout`'s code.

    This checkout runs through this environment's install. Another one runs its own code, on
    PYTHONPATH ahead of this environment's editable install: its service/ and training/ folders
    where they hold `convserve` as it is imported; before that layout, a copy laid out as the
    wheel is; before the package was named convserve (its folders imported as `service`), from
    its folder."""
    flags = ["--store", str(store), "--port", "0", "--metrics-port", "0", "--log-level",
             "WARNING", *extra]
    checkout = checkout.resolve()
    if checkout == REPO:
        return launch(serve_command(*flags), cwd=REPO)
    if (checkout / "service" / "convserve").is_dir():  # its folders hold `convserve` as it is
        path = os.pathsep.join(str(checkout / folder) for folder in ("service", "training"))
        return launch(serve_command(*flags), cwd=checkout, env={**os.environ, "PYTHONPATH": path})
    if "package-dir" not in (checkout / "pyproject.toml").read_text():
        return launch([sys.executable, "-m", "service.cli", "serve", *flags], cwd=checkout)
    layout = Path(tempfile.mkdtemp(prefix="convserve-layout-"))
    atexit.register(shutil.rmtree, layout, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(checkout / "service", layout / "convserve", ignore=skip)
    shutil.copytree(checkout / "training", layout / "convserve" / "training", ignore=skip)
    return launch(serve_command(*flags), cwd=checkout,
                  env={**os.environ, "PYTHONPATH": str(layout)})


def batches_served(server: LaunchedServer) -> tuple[float, float]:
    """(ORT calls, images) so far, summed over the server's processes, from /metrics."""
    from urllib.request import urlopen

    calls = images = 0.0
    for url in server.metrics_urls:
        text = urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("convserve_batch_size_count"):
                calls += float(line.split()[-1])
            elif line.startswith("convserve_batch_size_sum"):
                images += float(line.split()[-1])
    return calls, images


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and its children (the workers), from /proc,
    Linux only. Reaped children count too (cutime/cstime)."""
    def own(one: int) -> float:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own(pid) + sum(own(child) for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            children += [int(c) for c in task.read_text().split()]
    return children


def rss_mb(pid: int) -> float:
    total = 0.0
    for one in (pid, *child_pids(pid)):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total
