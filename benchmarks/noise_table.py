"""One table of the label-noise study: every noise model and rate in a row, every method in a
column (clean held-out mixture accuracy, mean ± sd over seeds), then the default's suspect report.

Reads the result files ``benchmarks/finetune.py --out rates [--noise ...]`` wrote (the 20 %
rows: its ``--resume`` runs on the noise study's baselines) and writes
``<results>/noise_table.md``. Nothing is trained here.

Usage: ``python benchmarks/noise_table.py [--results DIR]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib.results import md_header, provenance  # noqa: E402

METHODS = ["random_k", "stratified_k", "balanced_k", "accum_B", "loss", "default"]
LABELS = {
    "random_k": "random k",
    "stratified_k": "stratified k",
    "balanced_k": "balanced k",
    "accum_B": "batch B accumulated",
    "loss": "`loss` (old default)",
    "default": "**default** (`consensus_loss`)",
}
CONDITIONS = (
    [("clean", "rates")]
    + [
        (f"{model.replace('_', ' ')} {int(rate * 100)} %", f"rates_noise-{model}-{rate:g}")
        for model in ("random_tokens", "swap_within_source", "other_task")
        for rate in (0.1, 0.2, 0.4)
    ]
    + [("random tokens 20 %, all in the largest source", "rates_noise-random_tokens-0.2-concentrated")]
)


def cell(summary: dict, method: str, key: str = "accuracy_mixture") -> str:
    s = summary.get(method)
    return "-" if s is None else f"{s[key]['mean']:.3f} ± {s[key]['sd']:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results" / "finetune"))
    args = ap.parse_args(argv)
    folder = Path(args.results)
    rows, reports = [], []
    for label, stem in CONDITIONS:
        path = folder / f"{stem}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        ms = data["summary"]["methods"]
        rows.append(f"| {label} | " + " | ".join(cell(ms, m) for m in METHODS) + " |")
        report = ms.get("default", {}).get("noise_report")
        loss_report = ms.get("loss", {}).get("noise_report")
        if report:
            r = {k: f"{v['mean']:.2f}" for k, v in report.items()}
            share_loss = "-" if not loss_report else f"{loss_report['selected_corrupted_share']['mean']:.2f}"
            reports.append(
                f"| {label} | {r['selected_corrupted_share']} | {share_loss} | "
                f"{r.get('suspect_precision', '-')} | {r.get('suspect_recall', '-')} |"
            )
    steps = data["summary"]["steps"] if rows else "?"
    lines = [
        "# Label noise: every model and rate (`benchmarks/noise_table.py`)",
        "",
        f"`benchmarks/finetune.py`, B = 64, k = 16, {steps} steps, 3 seeds, LoRA, AdamW; training answers "
        "corrupted, scored on clean held-out answers. Mixture-weighted exact-match accuracy, mean ± sd over seeds.",
        "",
        "| training data | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
        *rows,
        "",
        "What the default trained on and flagged: the share of its coreset whose answer was corrupted (`loss`'s "
        "beside it), and the precision and recall of `Coreset.suspects` against the corrupted rows (over all steps).",
        "",
        "| training data | corrupted share, default | corrupted share, `loss` | suspect precision | suspect recall |",
        "|---|---|---|---|---|",
        *reports,
    ]
    out = folder / "noise_table.md"
    out.write_text(md_header(provenance("noise_table")) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
