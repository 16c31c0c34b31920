"""Load benchmark of `danlu serve`: dynamic batching on against off, overload, a memory soak.

    .venv/bin/python benchmarks/serve_load.py [--run runs/fashion_cnn] [--requests 10000]
        [--concurrency 64] [--max-batch-size 32] [--max-wait-ms 10] [--torch-threads 1]
        [--repeats 2] [--soak-s 180] [--soak-warmup-s 60]

Serves runs/fashion_cnn when it exists (what `danlu quickstart` trains), else trains
configs/fashion_cnn.yaml for --train-steps steps into runs/serve_load_fashion (reused next
time), else, without Fashion-MNIST on disk, a tiny MLP on scikit-learn's 8×8 digits. Each phase
starts `danlu serve` as a subprocess on 127.0.0.1 and a free port, waits for /ready, warms up,
fires one-image POST /v1/predict requests (base64 PNG) from 64 httpx.AsyncClient workers (a
fixed number of requests, or a fixed time, under a global deadline), reads the batch-size
histogram from /metrics, and stops the server with SIGTERM. The defaults are the settings that
measured best here: 10 ms of batching wait, and one torch thread in the server (client and
server share 2 cores; torch's second thread only contends with them):

  batching   --max-batch-size B --max-wait-ms W     N requests   } --repeats times, interleaved;
  no-batch   --max-batch-size 1                     N requests   } the best of each is kept
  overload   batching and --max-queue 8             N/2 requests: 429s with Retry-After
  soak       batching, steady load for --soak-s s   the server's RSS sampled every 2 s
             (RSS climbs ~10 MB over the first ~80 s of load, then stays flat: the first
             --soak-warmup-s seconds are not counted)

Prints a markdown table (status counts, p50/p90/p99 latency, requests/s, mean batch), the
throughput ratio batching / no-batch and the soak's memory, and writes them to
benchmarks/results/serve_load.json and benchmarks/_serve_section.md. Every 200 is checked
against Predictor.predict on the same image. Exits 1 if any phase saw a 5xx, a connection
error, a wrong label, a 429 without Retry-After, or a non-zero exit code after SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
SECTION = ROOT / "benchmarks" / "_serve_section.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")
DANLU = Path(sys.executable).with_name("danlu")
SAMPLE_EVERY_S = 2.0
FLAT_MB = 5.0  # memory growth after warm-up under this is "flat"


# ------------------------------------------------------------------------ run and inputs


def pick_run(given: str | None, steps: int) -> Path:
    """The run to serve: --run, runs/fashion_cnn, a short Fashion-MNIST run, or a tiny one."""
    if given:
        return Path(given)
    for path in (ROOT / "runs" / "fashion_cnn", ROOT / "runs" / "serve_load_fashion"):
        if (path / "model.safetensors").is_file():
            return path
    import danlu

    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        out = ROOT / "runs" / "serve_load_fashion"
        overrides = [f"train.max_steps={steps}", "train.tensorboard=false"]
        danlu.train(ROOT / "configs" / "fashion_cnn.yaml", overrides, run_dir=out, force=True)
        return out
    out = ROOT / "runs" / "serve_load_digits"
    if not (out / "model.safetensors").is_file():
        cfg = {"name": "serve_load_digits", "seed": 0, "data": {"dataset": "digits"},
               "model": {"type": "mlp", "hidden_sizes": [64]},
               "train": {"epochs": 10, "tensorboard": False}}  # fmt: skip
        danlu.train(cfg, run_dir=out)
    return out


def request_bodies(run: Path, n: int) -> tuple[list[bytes], list[str], str]:
    """`n` distinct one-image request bodies, the label Predictor.predict gives each, and
    where the images come from."""
    from PIL import Image

    from danlu.serve.predictor import Predictor

    predictor = Predictor.load(run)
    if tuple(predictor.spec.input_shape) == (1, 28, 28) and FASHION.is_dir():
        from danlu.data.images import read_idx_pair

        files = [FASHION / f"t10k-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")]
        images, source = list(read_idx_pair(*files)[0][:n, 0]), "Fashion-MNIST test images"
    else:
        import sklearn.datasets

        digits = sklearn.datasets.load_digits().images[:n] * (255.0 / 16.0)
        images, source = list(np.round(digits).astype(np.uint8)), "scikit-learn digits"
    bodies = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        bodies.append(json.dumps({"inputs": [encoded]}).encode())
    labels = [str(v) for v in predictor.predict(images)["label"]]
    return bodies, labels, source


# ---------------------------------------------------------------------------- the server


class ServerProcess:
    """`danlu serve RUN --port P FLAGS` as a subprocess; `wait_ready` until /ready is 200."""

    def __init__(self, run: Path, flags: list[str], threads: int | None, log: Path) -> None:
        from danlu.serve.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(DANLU), "serve", str(run), "--port", str(self.port), *flags]
        self.command.append("--no-playground")
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        self.log = log.open("w")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)  # fmt: skip

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"`{shlex.join(self.command)}` did not get ready (see {self.log.name})")

    def rss_mb(self) -> float:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except ImportError:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then the exit code (None if it had to be killed)."""
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return code

    def batch_totals(self) -> tuple[float, float]:
        """(inputs, model calls) so far, from the danlu_batch_size histogram."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = {k: re.findall(rf"^danlu_batch_size_{k}\{{.*\}} (\S+)$", text, re.M)
                 for k in ("sum", "count")}  # fmt: skip
        return sum(map(float, found["sum"])), sum(map(float, found["count"]))


# ------------------------------------------------------------------------------ the load


@dataclass
class Load:
    statuses: Counter = field(default_factory=Counter)  # status code, or the error's name
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    retry_after_missing: int = 0  # 429s without a Retry-After header
    wrong: int = 0  # 200s whose label differs from Predictor.predict's
    seconds: float = 0.0


async def fire(url: str, bodies: list[bytes], labels: list[str], *, concurrency: int,
               requests: int | None = None, duration: float | None = None,
               deadline: float = 600.0) -> Load:  # fmt: skip
    """`requests` POST /v1/predict (or as many as fit in `duration` s) from `concurrency`
    workers, stopping at `deadline` s whatever happens. Each worker has its own client and
    connection: one client pooling 64 connections spends ~10 ms of CPU per request scanning
    its pool (httpcore), which made the client the bottleneck."""
    import httpx

    load, sent, start = Load(), [0], time.perf_counter()
    stop_at = start + min(duration or deadline, deadline)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # plain http; shared: each client would load the CAs
    headers = {"content-type": "application/json"}

    async def worker() -> None:
        async with httpx.AsyncClient(limits=limits, timeout=60.0, verify=tls) as client:
            while time.perf_counter() < stop_at and (requests is None or sent[0] < requests):
                i, sent[0] = sent[0] % len(bodies), sent[0] + 1
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/predict", content=bodies[i], headers=headers)
                except httpx.TransportError as e:
                    load.statuses[type(e).__name__] += 1
                    continue
                load.latencies.append(time.perf_counter() - t)
                load.statuses[r.status_code] += 1
                if r.status_code == 200 and r.json()["predictions"][0]["label"] != labels[i]:
                    load.wrong += 1
                load.retry_after_missing += r.status_code == 429 and "retry-after" not in r.headers

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - start
    return load


def summary(load: Load) -> dict[str, Any]:
    ms = np.array(load.latencies or [0.0]) * 1000
    count = sum(load.statuses.values())
    return {
        "requests": count,
        "status": {str(k): v for k, v in sorted(load.statuses.items(), key=str)},
        "5xx": sum(v for k, v in load.statuses.items() if isinstance(k, int) and k >= 500),
        "429": load.statuses.get(429, 0),
        "429_without_retry_after": load.retry_after_missing,
        "transport_errors": sum(v for k, v in load.statuses.items() if isinstance(k, str)),
        "wrong_labels": load.wrong,
        **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)},
        "seconds": load.seconds,
        "requests_per_s": count / load.seconds,
        "ok_per_s": load.statuses.get(200, 0) / load.seconds,
    }


def phase(name: str, flags: list[str], args: Any, data: tuple, *, requests: int | None = None,
          soak: bool = False) -> dict[str, Any]:  # fmt: skip
    """One server process under one load: the client's summary and the server's view."""
    run, bodies, labels = data
    log = Path(tempfile.gettempdir()) / f"danlu-serve-load-{name}.log"
    server = ServerProcess(run, flags, args.torch_threads, log)
    rss: list[tuple[float, float]] = []
    try:
        server.wait_ready()
        options = {"concurrency": args.concurrency, "deadline": args.deadline_s}
        asyncio.run(fire(server.url, bodies, labels, **options, requests=args.warmup))
        before = server.batch_totals()
        if soak:
            load = asyncio.run(sampled(server, rss, fire(
                server.url, bodies, labels, **options, duration=args.soak_s)))  # fmt: skip
        else:
            load = asyncio.run(fire(server.url, bodies, labels, **options, requests=requests))
        after = server.batch_totals()
    finally:
        code = server.stop()
    out = {"phase": name, "flags": flags, **summary(load), "exit_code": code}
    calls = after[1] - before[1]
    out["mean_batch"] = (after[0] - before[0]) / calls if calls else 0.0
    if soak:
        out["memory"] = memory(rss, args.soak_warmup_s)
    print(f"  {name}: {out['requests']} requests, {out['requests_per_s']:.0f}/s, "
          f"status {out['status']}, mean batch {out['mean_batch']:.1f}", flush=True)  # fmt: skip
    return out


async def sampled(server: ServerProcess, rss: list, work: Any) -> Load:
    """Await `work`, appending (seconds, server RSS in MB) to `rss` every SAMPLE_EVERY_S."""
    start = time.perf_counter()

    async def sample() -> None:
        while True:
            rss.append((time.perf_counter() - start, server.rss_mb()))
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.create_task(sample())
    try:
        return await work
    finally:
        sampler.cancel()
        rss.append((time.perf_counter() - start, server.rss_mb()))


def memory(samples: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """RSS after `warmup` seconds: first, last and max sample; growth = median of the last
    quarter of samples - median of the first quarter (single samples swing by a few MB), flat
    when under FLAT_MB; slope of a least-squares line, in MB per minute."""
    warm = [(t, m) for t, m in samples if t >= warmup] or samples
    t, mb = np.array([s[0] for s in warm]), np.array([s[1] for s in warm])
    k = max(len(mb) // 4, 1)
    return {
        "samples": [[round(a, 1), round(b, 2)] for a, b in samples],
        "warmup_s": warmup,
        "start_mb": float(mb[0]),
        "end_mb": float(mb[-1]),
        "max_mb": float(mb.max()),
        "growth_mb": float(np.median(mb[-k:]) - np.median(mb[:k])),
        "flat": bool(np.median(mb[-k:]) - np.median(mb[:k]) < FLAT_MB),
        "slope_mb_per_min": float(np.polyfit(t, mb, 1)[0]) * 60 if len(mb) > 1 else 0.0,
    }


# ------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    rows = ["| phase | server flags | requests | 200 | 429 | 5xx | p50 ms | p90 ms | p99 ms "
            "| requests/s | mean batch |", "|---|---|" + "---:|" * 9]  # fmt: skip
    for p in report["phases"]:
        rows.append(
            f"| {p['phase']} | `{' '.join(p['flags'])}` | {p['requests']:,} "
            f"| {p['status'].get('200', 0):,} | {p['429']:,} | {p['5xx']} | {p['p50_ms']:.1f} "
            f"| {p['p90_ms']:.1f} | {p['p99_ms']:.1f} | {p['requests_per_s']:,.0f} "
            f"| {p['mean_batch']:.1f} |"
        )
    mem = report["phases"][3]["memory"]
    each = report["ok_per_s_each_try"]
    tries = "; ".join(f"{k}: {', '.join(f'{v:,.0f}' for v in each[k])}/s" for k in each)
    return "\n".join([*rows, "",
        f"Throughput batching / no batching: **{report['ratio']:.2f}×** (200s per second, best "
        f"of {tries}).",
        f"Soak {report['soak_s']:g} s: server RSS after {mem['warmup_s']:g} s of warm-up "
        f"{mem['start_mb']:.1f} → {mem['end_mb']:.1f} MB (max {mem['max_mb']:.1f}); growth "
        f"{mem['growth_mb']:+.1f} MB (median of the last quarter − first quarter of samples), "
        f"slope {mem['slope_mb_per_min']:+.2f} MB/min: "
        f"{'flat' if mem['flat'] else 'GROWING'}."])  # fmt: skip


def section(report: dict[str, Any], table: str) -> str:
    return (
        "## Serving under load: `benchmarks/serve_load.py`\n\n"
        f"`danlu serve {report['run']}` as a subprocess on 127.0.0.1, one-image POST /v1/predict "
        f"requests ({report['inputs']} as base64 PNG) from {report['concurrency']} "
        f"httpx.AsyncClient workers after {report['warmup']} warm-up requests; client and "
        "server on the same machine. Every 200 is checked against `Predictor.predict` on the "
        "same image; the server is stopped with SIGTERM after each phase (exit code 0).\n\n"
        f"```\n$ {report['command']}\n{report['environment']}\n```\n\n"
        f"{table}\n\nMeasured {report['date']}.\n\n{READING}\n"
    )


READING = """How to read it: client and server share the 2 cores. With batching, throughput is bound by
HTTP handling, not by the model: the server spends about 2 ms of CPU per request in uvicorn's
pure-Python HTTP parser, FastAPI, pydantic and PNG decoding, and the httpx client about as much,
while the model runs 32 images in about 10 ms. Without batching every request pays a whole
`Predictor.predict` call (about 3 ms at batch 1, mostly fixed costs: tensors, softmax, a pandas
frame) on the one worker thread. Under the tiny queue of the overload phase most requests get
429 with Retry-After at once, none a 5xx, and the accepted ones are answered correctly."""


def environment(threads: int | None) -> str:
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu.group(1) if cpu else 'CPU'}, {os.cpu_count()} cores, server "
            f"OMP_NUM_THREADS={threads or 'default'}; load average {load} at start")  # fmt: skip


def failures(report: dict[str, Any]) -> list[str]:
    bad = [f"{p['phase']}: {p[key]} {key}" for p in report["phases"]
           for key in ("5xx", "transport_errors", "wrong_labels", "429_without_retry_after")
           if p[key]]  # fmt: skip
    bad += [f"{p['phase']}: exit code {p['exit_code']} after SIGTERM"
            for p in report["phases"] if p["exit_code"] != 0]  # fmt: skip
    if not report["phases"][2]["429"]:
        bad.append("overload: no 429")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run directory to serve (default: see above)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--overload-queue", type=int, default=8)
    ap.add_argument("--soak-s", type=float, default=180.0)
    ap.add_argument("--soak-warmup-s", type=float, default=60.0)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2, help="batching / no-batch: best of")
    ap.add_argument("--deadline-s", type=float, default=900.0, help="per phase")
    ap.add_argument("--torch-threads", type=int, default=1, help="server's OMP_NUM_THREADS")
    ap.add_argument("--train-steps", type=int, default=600)
    args = ap.parse_args()

    env = environment(args.torch_threads)
    run = pick_run(args.run, args.train_steps)
    bodies, labels, inputs = request_bodies(run, 256)
    data = (run, bodies, labels)
    batching = ["--max-batch-size", str(args.max_batch_size),
                "--max-wait-ms", f"{args.max_wait_ms:g}"]  # fmt: skip
    overload = [*batching, "--max-queue", str(args.overload_queue)]
    print(f"serving {run} at concurrency {args.concurrency}", flush=True)
    tries: dict[str, list[dict]] = {"batching": [], "no-batch": []}
    for _ in range(args.repeats):  # interleaved, so both see the same background load
        tries["batching"].append(phase("batching", batching, args, data, requests=args.requests))
        single = ["--max-batch-size", "1"]
        tries["no-batch"].append(phase("no-batch", single, args, data, requests=args.requests))
    best = {k: max(v, key=lambda p: p["ok_per_s"]) for k, v in tries.items()}
    phases = [
        best["batching"],
        best["no-batch"],
        phase("overload", overload, args, data, requests=args.requests // 2),
        phase("soak", batching, args, data, soak=True),
    ]
    report = {
        "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
        "inputs": inputs,
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "environment": env,
        "date": time.strftime("%Y-%m-%d"),
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "soak_s": args.soak_s,
        "phases": phases,
        "ok_per_s_each_try": {k: [p["ok_per_s"] for p in v] for k, v in tries.items()},
        "ratio": phases[0]["ok_per_s"] / max(phases[1]["ok_per_s"], 1e-9),
    }
    report["environment"] += ", " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + " at end"
    report["failures"] = failures(report)
    table = markdown(report)
    print(table)
    from danlu.rundir import atomic_write_json, atomic_write_text

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, report)
    atomic_write_text(SECTION, section(report, table))
    for line in report["failures"]:
        print("FAILED", line, file=sys.stderr)
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
