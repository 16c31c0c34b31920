"""fp32 against bf16 autocast for training the Fashion-MNIST CNN on this machine's CPU.

Shows why `train.precision: auto` picks bf16 only where the CPU runs it natively
(AVX512-BF16 or AMX): elsewhere bf16 is emulated and much slower than fp32.

    python benchmarks/precision.py [--steps 40]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from danlu.device import cpu_bf16_native
from danlu.models.cnn import CNN


def samples_per_second(precision: str, steps: int, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = CNN([1, 28, 28], 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    fp32 = samples_per_second("fp32", a.steps)
    bf16 = samples_per_second("bf16", a.steps)
    print(f"CPU has native bf16: {cpu_bf16_native()}; {torch.get_num_threads()} threads")
    print(f"  fp32 {fp32:8.0f} samples/s")
    print(f"  bf16 {bf16:8.0f} samples/s  (bf16/fp32 = {bf16 / fp32:.2f})")


if __name__ == "__main__":
    main()
