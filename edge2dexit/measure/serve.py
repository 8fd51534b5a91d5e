"""Load test of `edge2dexit serve`: N clients at once against `classify_many` at width N, in one run on the same texts.

For each N, with a Classifier of width N in this process and `edge2dexit serve --width N` in a process of its own on
loopback, both loaded and each given one text untimed (the first split and decode): round after round, `classify_many`
reads the texts N at a time, then N clients (asyncio, one HTTP connection each) send them to the service, one text
per request, the next once the last is answered. Interleaving rounds lets a noisy shared machine move both sides
together. Reported: docs/s of both, their ratio (the aim: at 32 clients, at least 0.9 of `classify_many`), the
requests' p50 and p99 latency, and errors. Bounded in count (`rounds` × the texts) and in time (`time_limit` per
round); only loopback is ever contacted.

`running_service` starts the service the same way for the tests. Nothing heavy is imported until a run starts: the
CLI reads this module's defaults.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

from ..models import SAMPLE_REVIEW
from ..sentences import Splitter
from ..serve.settings import LOOPBACK
from ..settings import EngineSettings

if TYPE_CHECKING:
    from ..classifier import Classifier

CLIENTS = (1, 8, 32)
DOCS = 64
ROUNDS = 2
TIME_LIMIT = 600.0  # seconds, per run
STARTUP_LIMIT = 120.0  # seconds for the service to load its model and listen
AIM = 0.9  # of classify_many's docs/s, at the most clients


class Service(NamedTuple):
    url: str
    process: subprocess.Popen
    log: Path


@contextmanager
def running_service(*options: str, startup_limit: float = STARTUP_LIMIT) -> Iterator[Service]:
    """`edge2dexit serve OPTIONS` on loopback, on a free port, in a process of its own (its stderr in a log file);
    yields once it listens, and ends it with SIGTERM (then SIGKILL) if it still runs at the end."""
    with tempfile.TemporaryDirectory(prefix="edge2dexit-serve-") as directory:
        log = Path(directory) / "serve.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen([sys.executable, "-c", "from edge2dexit.cli import main; main()", "serve",
                                        "--host", LOOPBACK, "--port", "0", *options],
                                       stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        try:
            yield Service(_wait_for_url(process, log, startup_limit), process, log)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_for_url(process: subprocess.Popen, log: Path, limit: float) -> str:
    """The URL of the `serving URL` line the service prints once it listens."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("edge2dexit: serving "):
                return line.split()[2]
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"edge2dexit serve did not start:\n{log.read_text(errors='replace')[-2000:]}")


def sample_texts(n: int) -> list[str]:
    """`n` texts from the sample review: its sentences rotated, and cut to 6 to 12 of them."""
    sentences = Splitter().split(SAMPLE_REVIEW.read_text())
    return [" ".join((sentences[k % len(sentences):] + sentences[: k % len(sentences)])[: 6 + k % 7])
            for k in range(n)]


@dataclass(frozen=True)
class Row:
    clients: int
    many_docs_per_second: float
    served_docs_per_second: float
    p50: float
    p99: float
    errors: int

    @property
    def ratio(self) -> float:
        return self.served_docs_per_second / self.many_docs_per_second


@dataclass(frozen=True)
class ServeBenchmark:
    rows: list[Row]
    docs: int
    rounds: int
    n_ctx: int

    def table(self) -> str:
        lines = [f"{self.docs} texts, {self.rounds} rounds, n_ctx {self.n_ctx}; classify_many at width N against N "
                 "clients of `edge2dexit serve --width N`, one text per request, interleaved, measured in this run",
                 f"{'clients':>7} {'classify_many':>14} {'serve':>8} {'ratio':>6} {'p50 s':>7} {'p99 s':>7} "
                 f"{'errors':>6}",
                 f"{'':>7} {'docs/s':>14} {'docs/s':>8}"]
        for r in self.rows:
            lines.append(f"{r.clients:7d} {r.many_docs_per_second:14.2f} {r.served_docs_per_second:8.2f} "
                         f"{r.ratio:6.2f} {r.p50:7.2f} {r.p99:7.2f} {r.errors:6d}")
        last = self.rows[-1]
        met = last.ratio >= AIM and last.errors == 0
        lines.append(f"aim at {last.clients} clients: at least {AIM:.0%} of classify_many's docs/s with 0 errors: "
                     f"{'met' if met else 'not met'} ({last.ratio:.0%}, {last.errors} errors)")
        return "\n".join(lines)


def serve_benchmark(texts: Sequence[str], clients: Sequence[int] = CLIENTS, rounds: int = ROUNDS,
                    bundle: str | Path | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                    time_limit: float = TIME_LIMIT) -> ServeBenchmark:
    from ..classifier import Classifier  # llama.cpp, loaded only when measuring

    rows = []
    for n in clients:
        options = ["--width", str(n), "--n-ctx", str(n_ctx)]
        options += ["--bundle", str(bundle)] if bundle is not None else []
        options += ["--threads", str(n_threads)] if n_threads is not None else []
        with Classifier(bundle, settings=EngineSettings(n_ctx, n, n_threads=n_threads)) as clf, \
                running_service(*options) as service:
            clf.classify(texts[0])  # untimed, as the service's first text (`_load`)
            many_seconds = served_seconds = 0.0
            latencies: list[float] = []
            errors = 0
            for _ in range(rounds):
                many_seconds += _classify_many(clf, texts)
                seconds, round_latencies, round_errors = asyncio.run(
                    asyncio.wait_for(_load(service.url, texts, n), time_limit))
                served_seconds += seconds
                latencies += round_latencies
                errors += round_errors
        latencies.sort()
        docs = rounds * len(texts)
        rows.append(Row(n, docs / many_seconds, docs / served_seconds, statistics.median(latencies),
                        latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], errors))
    return ServeBenchmark(rows, len(texts), rounds, n_ctx)


def _classify_many(clf: Classifier, texts: Sequence[str]) -> float:
    """Seconds `clf.classify_many` takes over `texts`, read on a thread of its own as the service reads: in the main
    thread, libgomp's spinning workers (llama.cpp's CPU backend is built with OpenMP) slowed the same reads 2-8× on
    this 2-core machine, and OMP_WAIT_POLICY=passive took that away (reported; the service never reads there)."""

    def read() -> float:
        began = time.perf_counter()
        for _, outcome in clf.classify_many(texts):
            if isinstance(outcome, Exception):
                raise outcome
        return time.perf_counter() - began

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(read).result()


async def _load(url: str, texts: Sequence[str], clients: int) -> tuple[float, list[float], int]:
    """`clients` clients sending `texts` between them, one per request: (seconds, latencies, errors)."""
    import httpx

    pending = iter(texts)
    latencies: list[float] = []
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for text in pending:
            sent = time.perf_counter()
            try:
                response = await http.post("v1/classify", json={"text": text})
                errors += response.status_code != 200
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIME_LIMIT, limits=limits) as http:
        (await http.post("v1/classify", json={"text": texts[0]})).raise_for_status()  # untimed, as classify_many's
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - began, latencies, errors
