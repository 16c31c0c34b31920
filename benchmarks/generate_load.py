"""Generation under concurrent load: requests batched together against one at a time.

    .venv/bin/python benchmarks/generate_load.py [--run runs/gpt_bible_char] [--requests 256]
        [--concurrency 16] [--max-tokens 64] [--max-batch-size 16] [--train-steps 100]

Serves a causal language model (--run; else configs/gpt_bible_char.yaml trained for
--train-steps steps into runs/generate_load_gpt and reused next time: the speed of generation
does not depend on how well it was trained) with `danlu serve` as a subprocess on 127.0.0.1,
and sends --requests POST /v1/completions from --concurrency threads: a Bible-verse opening as
the prompt, --max-tokens new tokens (stop strings none, so every request runs to its limit),
temperature 0.8 with a seed per request. Phase "batched" serves with --max-batch-size N (the
requests waiting while a call runs are continued together), phase "one at a time" with
--max-batch-size 1. Every answer must be the same text in both phases (same seed, same
prompt): batching changes the speed, not the result. Prints a markdown table (requests/s,
generated tokens/s, p50/p99 latency, prompts per model call) and the throughput ratio, and
writes benchmarks/results/generate_load.json. Exits 1 on any non-200 or a differing answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DANLU, ServerProcess  # noqa: E402  (the benchmarks' server harness)

PROMPTS = [
    "In the beginning God created", "And God said, Let there be", "The LORD is my shepherd",
    "Blessed are the meek", "And it came to pass", "Now the serpent was", "In my Father's house",
    "For God so loved the world",
]  # fmt: skip


def pick_run(given: str | None, steps: int) -> Path:
    if given:
        return Path(given)
    run = ROOT / "runs" / "generate_load_gpt"
    if not (run / "model.safetensors").is_file():
        cmd = [str(DANLU), "pretrain", "configs/gpt_bible_char.yaml", f"train.max_steps={steps}",
               f"train.eval_every={steps}", "--run-dir", str(run)]  # fmt: skip
        print("training", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return run


def fire(url: str, bodies: list[dict], concurrency: int) -> dict[str, Any]:
    import httpx

    answers: list[Any] = [None] * len(bodies)
    latency: list[float] = [0.0] * len(bodies)
    todo = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/completions", json=bodies[i])
                latency[i] = time.perf_counter() - t0
                answers[i] = r.json() if r.status_code == 200 else {"status": r.status_code}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    ok = [a for a in answers if "choices" in a]
    tokens = sum(a["usage"]["completion_tokens"] for a in ok)
    return {
        "requests": len(bodies), "ok": len(ok), "seconds": seconds,
        "requests_per_s": len(ok) / seconds, "tokens_per_s": tokens / seconds,
        "p50_ms": 1000 * statistics.median(latency),
        "p99_ms": 1000 * sorted(latency)[max(0, round(0.99 * len(latency)) - 1)],
        "texts": [a["choices"][0]["text"] if "choices" in a else None for a in answers],
    }  # fmt: skip


def phase(name: str, run: Path, flags: list[str], bodies: list[dict], args: Any) -> dict:
    log = Path(tempfile.gettempdir()) / f"danlu-generate-load-{name.replace(' ', '-')}.log"
    server = ServerProcess(run, flags, None, log)
    try:
        server.wait_ready()
        fire(server.url, bodies[: args.concurrency], args.concurrency)  # warm-up
        rows0, calls0 = server.batch_totals()
        result = fire(server.url, bodies, args.concurrency)
        rows, calls = server.batch_totals()
        result["prompts_per_call"] = (rows - rows0) / max(calls - calls0, 1)
    finally:
        result_code = server.stop()
    result["exit_code"] = result_code
    print(f"  {name}: {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['prompts_per_call']:.1f} prompts per call", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    run = pick_run(args.run, args.train_steps)
    bodies = [
        {"model": run.name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
         "temperature": 0.8, "seed": i}
        for i in range(args.requests)
    ]  # fmt: skip
    print(f"serving {run} · {args.requests} requests at concurrency {args.concurrency}")
    report = {
        "batched": phase("batched", run, ["--max-batch-size", str(args.max_batch_size)],
                         bodies, args),
        "one at a time": phase("one at a time", run, ["--max-batch-size", "1"], bodies, args),
    }  # fmt: skip
    same = report["batched"]["texts"] == report["one at a time"]["texts"]
    ratio = report["batched"]["tokens_per_s"] / report["one at a time"]["tokens_per_s"]
    print("\n| phase | requests | 200 | requests/s | tokens/s | p50 ms | p99 ms | prompts/call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['requests']} | {r['ok']} | {r['requests_per_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['prompts_per_call']:.1f} |")  # fmt: skip
    print(f"\nThroughput batched / one at a time: **{ratio:.2f}×**; the same {args.requests} "
          f"texts in both phases: {same}")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "generate_load.json"
    summary = {k: {m: v for m, v in r.items() if m != "texts"} for k, r in report.items()}
    out.write_text(json.dumps({"ratio": ratio, "same_texts": same, **summary}, indent=2) + "\n")
    bad = [r for r in report.values() if r["ok"] != r["requests"] or r["exit_code"] != 0]
    sys.exit(1 if bad or not same else 0)


if __name__ == "__main__":
    main()
