"""Convert a comparison's results.json written before typed rows and pairs (format 1) to format 2, once, and
re-render its report from it; no number changes.

    python results/convert_v1.py results/shapes-fair results/fmnist-fair results/demo

Format 1 named pairs by their title and rows by a string key ("mse-continued/cfg-w1.5-phi0.7"); format 2 stores
each row's fields and each pair's role (``experiments/rows.py``). The only place that reads the old strings is
this script: it maps the titles format 1 could write to their roles, and the row keys format 1 could write (no
guidance, null label, CFG, autoguidance by the teacher) to their fields.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from perceptual_diffusion.experiments.report import write_report
from perceptual_diffusion.experiments.rows import Pair, Row


def row_of_v1_key(key: str) -> Row:
    """The row a format-1 key names."""
    model, _, guidance = key.rpartition("/")
    if guidance in ("none", "null-label"):
        return Row(model, guidance)  # type: ignore[arg-type]
    kind, w, phi = guidance.split("-")
    return Row(model, kind, float(w[1:]), float(phi[3:]))  # type: ignore[arg-type]


def role_of_v1_title(title: str) -> tuple[str, str | None]:
    """The role (and guidance method) of a format-1 pair title."""
    fixed = {
        "self-perceptual vs MSE continued, no guidance (the paper's claim)": "headline",
        "self-perceptual vs its teacher": "vs-teacher",
        "MSE continued vs the teacher": "teacher-residual",
        "unconditional: self-perceptual vs MSE continued": "unconditional",
    }
    if title in fixed:
        return fixed[title], None
    if title.startswith("self-perceptual (no guidance) vs MSE + CFG"):
        return "vs-guidance", "cfg"
    if title.endswith("vs MSE continued (beyond the paper)"):
        return "variant", None
    raise ValueError(f"unknown format-1 pair title {title!r}")


def convert(results: dict) -> dict:
    """Format 2 from format 1 (format 2 is returned unchanged)."""
    if results.get("format") == 2:
        return results
    out = dict(results)
    rows = [row_of_v1_key(r["key"]) for r in results["rows"]]
    assert all(r.slug == old["key"] for r, old in zip(rows, results["rows"])), "a slug must equal its v1 key"
    out["rows"] = [r.to_dict() for r in rows]
    pairs = []
    for title, p in results.pop("paired").items():
        role, method = role_of_v1_title(title)
        pair = Pair(role, row_of_v1_key(p["a"]), row_of_v1_key(p["b"]), method)  # type: ignore[arg-type]
        assert pair.title == title, f"{pair.title!r} != {title!r}"
        pairs.append(pair.to_dict() | {"metrics": p["metrics"]})
    out.pop("paired", None)
    out["pairs"] = pairs
    out["format"] = 2
    return out


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        results = convert(json.loads((folder / "results.json").read_text()))
        write_report(folder, results)
        print(f"{folder}: converted and re-rendered")


if __name__ == "__main__":
    main(sys.argv[1:])
