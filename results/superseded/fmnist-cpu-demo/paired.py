"""Paired per-training-seed differences (self-perceptual minus MSE continued, no guidance) from a compare results.json."""

import json, statistics, sys

r = json.load(open(sys.argv[1]))
rows = {row["key"]: row for row in r["rows"]}


def per_seed(key, metric):
    out = {}
    for run in rows[key]["runs"]:
        out.setdefault(run["training_seed"], []).append(run["metrics"][metric])
    return {s: statistics.mean(v) for s, v in out.items()}


for metric in ("fid", "kid", "is", "precision", "recall", "density", "coverage"):
    a, b = per_seed("self-perceptual/none", metric), per_seed("mse-continued/none", metric)
    d = [a[s] - b[s] for s in sorted(a)]
    spread = statistics.stdev(d) if len(d) > 1 else float("nan")
    print(f"{metric}: SP - MSE per seed {[round(x, 4) for x in d]}, mean {statistics.mean(d):.4f} ± {spread:.4f}")
# sampling-repeat noise: |repeat0 - repeat1| for the same model and seed
for key in ("mse-continued/none", "self-perceptual/none"):
    by = {}
    for run in rows[key]["runs"]:
        by.setdefault(run["training_seed"], []).append(run["metrics"]["fid"])
    print(key, "FID by seed (repeats):", {s: [round(x, 3) for x in v] for s, v in by.items()})
