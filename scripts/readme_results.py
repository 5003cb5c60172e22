"""Collect the artefacts of scripts/bench_readme.sh into docs/results/ and write the README's
Results section from them (so no number in it is typed by hand).

usage: python scripts/readme_results.py RUN_DIR [DOCS_DIR]   (then paste DOCS_DIR/results.md)
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

from twotower.eval.quality import AGGREGATED, aggregate

STAGES = ["speed_trained", "speed_blocks", "speed_untrained", "speed_batch4", "speed_left_prefix",
          "quality_trained", "quality_untrained", "quality_left_prefix", "speed_verified", "speed_verified_dial"]


def copy_artefacts(run: Path, docs: Path) -> list[str]:
    found = []
    for stage in STAGES:
        src = run / stage
        if not src.is_dir():
            continue
        dst = docs / stage
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix in (".json", ".md", ".png"):
                shutil.copy2(f, dst / f.name)
        found.append(stage)
    return found


def speed_rows(docs: Path, stage: str) -> list[dict]:
    path = docs / stage / "speed.json"
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def quality(docs: Path, stage: str) -> dict | None:
    path = docs / stage / "quality.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verified_label(row: dict) -> str:
    """Verified decoding drafts in one denoiser forward: the whole block, or (more steps per
    block) the confident run from the left, as long as the threshold allows."""
    return " verified, whole-block drafts" if row.get("steps_per_block") == 1 else " verified, confident drafts"


def dial_table(docs: Path) -> list[str]:
    """One row per decoding setting: speed from the speed stages, quality where measured."""
    by_dial, ar_of = {}, {}
    for stage, label in (("quality_trained", "trained"), ("quality_untrained", "untrained"),
                         ("quality_left_prefix", "trained")):
        report = quality(docs, stage)
        for r in report["diffusion"] if report else []:
            rule = report["settings"]["commit_rule"]
            by_dial[(label, rule, r["block_size"], r["threshold"])] = r
            ar_of[(label, rule, r["block_size"], r["threshold"])] = report["ar"]
    lines = [
        "| denoiser | mode | commit rule | batch | block | threshold | speed-up vs AR | tokens/NFE | token agreement "
        "| judge ppl (AR) | HumanEval pass@1 (AR) | quality retention |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, label in (("speed_trained", "trained"), ("speed_left_prefix", "trained"), ("speed_blocks", "trained"),
                         ("speed_batch4", "trained"), ("speed_untrained", "untrained"), ("speed_verified", "trained"),
                         ("speed_verified_dial", "trained")):
        for r in speed_rows(docs, stage):
            if stage != "speed_trained" and r["mode"] != "mask_diffusion":
                continue  # the baselines appear once, from the first stage
            rule = r.get("commit_rule", "threshold")
            key = (label, rule, r.get("block_size"), r.get("threshold"))
            # eval quality's numbers are per request (decoding is batch-invariant): shown once, at batch 1
            # verified decoding's text is AR's (exact match below): no quality stage of its own
            q = by_dial.get(key) if r["batch_size"] == 1 and not r.get("verify") else None
            m = q["metrics"] if q else None
            # recomputed from the per-metric retentions, so the column follows the library's
            # current definition of the aggregate whatever version wrote the JSON
            kept = aggregate(q["retention"]) if q else None
            ar = ar_of[key] if q else {}
            tpn = 1 / r["nfe_per_token"] if r.get("nfe_per_token") else None
            cells = [
                label if r["mode"] == "mask_diffusion" else "–",
                r["mode"] + (verified_label(r) if r.get("verify") else ""),
                rule if r["mode"] == "mask_diffusion" else "", str(r["batch_size"]),
                str(r.get("block_size", "")),
                "–" if r.get("steps_per_block") == 1 else str(r.get("threshold", "")),  # one step: no dial
                f"{r['speedup_vs_ar']:.2f}x",
                f"{tpn:.2f}" if tpn else "–", f"{100 * r['token_agreement']:.0f}%",
                f"{m['judge_perplexity']:.1f} ({ar['judge_perplexity']:.1f})" if m and m.get("judge_perplexity") else "–",
                f"{m['humaneval_pass_at_1']:.1f} ({ar['humaneval_pass_at_1']:.1f})"
                if m and m.get("humaneval_pass_at_1") is not None else "–",
                f"{100 * kept:.1f}%" if kept else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    run = Path(sys.argv[1])
    docs = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/results")
    stages = copy_artefacts(run, docs)
    if not stages:
        raise SystemExit(f"{run}: no results of scripts/bench_readme.sh inside")
    first = json.loads((docs / stages[0] / "speed.json").read_text()) if stages[0].startswith("speed") else None
    box = first["box"] if first else {}
    out = ["## Results", ""]
    if box:
        days = sorted({datetime.fromtimestamp(f.stat().st_mtime).date() for s in stages
                       for f in (docs / s).glob("*.json")})
        day = str(days[0]) if len(days) == 1 else f"{days[0]} to {days[-1]}"
        out += [f"Measured {day} on {box['cpu']}, {box['threads']} threads, torch {box['torch']}, "
                f"transformers {box['transformers']}, {box['dtype']}, by `scripts/bench_readme.sh` (stages: "
                f"{', '.join(stages)}); this table by `scripts/readme_results.py`.", ""]
    out += dial_table(docs)
    out += ["", f"Quality retention is the geometric mean of the diffusion / AR ratios of "
                f"{', '.join(AGGREGATED)} (where defined), recomputed from each report's per-metric ratios.",
            "", "Full tables: " + ", ".join(f"[{s}]({docs.as_posix()}/{s}/{'speed' if s.startswith('speed') else 'quality'}.md)"
                                          for s in stages), ""]
    if (docs / "speed_trained" / "speed.png").is_file():
        out += [f"![speed-up vs agreement]({docs.as_posix()}/speed_trained/speed.png)", ""]
    (docs / "results.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
