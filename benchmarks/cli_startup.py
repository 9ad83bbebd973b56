"""How long `perceptual-diffusion --help` takes, against a bare Python start-up measured in the same run.

Prints the median of several runs of each and their ratio; the target (issue 12) is a --help under 1 s. Run on an
idle machine: `python benchmarks/cli_startup.py`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def median_seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    repeats = 5
    bare = median_seconds([sys.executable, "-c", "pass"], repeats)
    cli = [sys.executable, "-c", "from perceptual_diffusion.cli import main; main(['--help'])"]
    help_s = median_seconds(cli, repeats)
    sub = median_seconds(cli[:-1] + ["from perceptual_diffusion.cli import main; main(['compare', '--help'])"], repeats)
    torch_s = median_seconds([sys.executable, "-c", "import torch, diffusers"], repeats)
    print(f"python start-up         {bare:.3f} s")
    print(f"perceptual-diffusion -h {help_s:.3f} s  ({help_s / bare:.1f}x start-up)")
    print(f"compare --help          {sub:.3f} s  ({sub / bare:.1f}x start-up)")
    print(f"import torch, diffusers {torch_s:.3f} s  (what --help cost before: {torch_s / help_s:.1f}x the new time)")


if __name__ == "__main__":
    main()
