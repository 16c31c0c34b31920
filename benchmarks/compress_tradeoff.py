"""Compressed variants of a trained run against the parent and against ONNX Runtime int8, side
by side: `danlu compress` makes every variant of the config's compress: section, evaluates it
on the parent's test split and times all of them in this one process with the same threads
(median of repeated runs at batch 1 and 32). ONNX Runtime's dynamic int8 (variant onnx-int8)
is the peer the issue names.

    python benchmarks/compress_tradeoff.py runs/fashion_cnn --config configs/fashion_cnn.yaml
    python benchmarks/compress_tradeoff.py runs/minilm_r8 --config configs/minilm_r8.yaml

Prints each variant's speed-up over the parent (fp32 torch) and over ONNX Runtime int8, its
size ratio and metric change, and the recommended variant within the accuracy budget.
"""

from __future__ import annotations

import argparse
import json

import torch

import danlu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="a trained run (the parent)")
    p.add_argument("--config", help="YAML with a compress: section (default: the run's)")
    p.add_argument("--peer", default="onnx-int8", help="the variant to compare against")
    p.add_argument("--overwrite", action="store_true", help="make the variants again")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result = danlu.compress(a.run, a.config, overwrite=a.overwrite)
    t = result.table
    rows = {r["name"]: r for r in t["rows"]}
    peer = rows.get(a.peer)
    print(f"{t['metric']} on the {t['split']} split; budget {t['budget']} points; "
          f"{a.threads} threads; batch 1 latency and batch 32 throughput (median)")  # fmt: skip
    print(f"{'variant':14} {'size':>7} {'ms@1':>8} {'/s@32':>9} {'×parent':>8} "
          f"{'×' + a.peer:>12} {t['metric']:>9} {'Δ pts':>7}")  # fmt: skip
    for r in t["rows"]:
        b32 = r["throughput"].get("32") or r["throughput"].get(32)
        versus = b32 / (peer["throughput"].get("32") or 1) if peer else float("nan")
        delta = r.get("delta") or 0.0
        print(
            f"{r['name']:14} {r.get('size_ratio', 1.0):>6.2f}x {r['latency_ms'].get('1', 0):>8.2f} "
            f"{b32:>9.0f} {r.get('speedup_b32', 1.0):>8.2f} {versus:>12.2f} "
            f"{r['metric']:>9.4f} {delta:>+7.2f}"
        )
    print(f"recommended: {t['recommended']} — {t['reason']}")
    print(json.dumps({"report": str(result.report)}))


if __name__ == "__main__":
    main()
