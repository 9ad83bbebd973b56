"""FID by learning rate and step of a stage-1 lr sweep folder (results/stage1-lr-sweep/run.sh), as markdown."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(folder: Path) -> None:
    scores: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("lr*/score-ema-*.json")):
        step = int(re.search(r"ema-(\d+)", path.name).group(1))
        rows = json.loads(path.read_text())
        row = rows[0] if isinstance(rows, list) else rows
        fid = row.get("fid", row.get("metrics", {}).get("fid"))
        scores.setdefault(path.parent.name.removeprefix("lr"), {})[step] = fid
    steps = sorted({s for by_step in scores.values() for s in by_step})
    print("| lr | " + " | ".join(f"FID @ {s}" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for lr in sorted(scores, key=float):
        cells = [f"{scores[lr][s]:.2f}" if s in scores[lr] else "" for s in steps]
        print(f"| {lr} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
