"""What a comparison writes: ``compare.json``, ``compare.md``, the tasks' precision-recall
curves old against new in one PNG, and a contact sheet of every task's negative flips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from waterdrop.curation.contact_sheet import contact_sheet
from waterdrop.evaluation.metrics import json_safe, pr_curve

SHEET_LIMIT = 64  # negative flips shown per task (all are listed in compare.json)


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _threshold(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "per label"
    return f"{value:.3f}"


def _flip_images(record: dict, arrays: dict) -> None:
    """Name the images behind each task's negative flips (their rows are positions in ``arrays``)."""
    for name, result in record["tasks"].items():
        rows = result.get("flips", {}).pop("negative_rows", [])
        if name in arrays:
            result["flips"]["negative_flip_images"] = [str(arrays[name]["paths"][row]) for row in rows]


def markdown(record: dict) -> str:
    lines = ["# Release comparison", "",
             f"- deployed: `{record['deployed']}` (model hash {str(record['deployed_model_hash'])[:12]})",
             f"- candidate: `{record['candidate']}` (model hash {str(record['candidate_model_hash'])[:12]})",
             f"- gate: **{record['gate'].upper()}**"
             + (f", over budget: {', '.join(record['over_budget'])}" if record["over_budget"] else "")
             + (" (overridden with --force)" if record.get("forced") else ""), "",
             "| task | status | split (images) | metric | deployed | candidate | change [95% interval] | "
             "negative flips | positive flips | threshold deployed -> candidate | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in record["tasks"].items():
        if r["status"] != "compared":
            lines.append(f"| {name} | {r['status']} | - | - | - | - | - | - | - | - | {r.get('verdict', 'refused')}: "
                         f"{r['why']} |")
            continue
        low, high = r["difference_interval"]
        flips, thresholds = r["flips"], r["thresholds"]
        verdict = r["verdict"] + (": " + "; ".join(r["problems"]) if r["problems"] else "")
        lines.append(
            f"| {name} | compared | {r['split']} ({r['images']}) | {r['metric']} | {_number(r['deployed'])} | "
            f"{_number(r['candidate'])} | {r['difference']:+.4f} [{_number(low)}, {_number(high)}] | "
            f"{flips['negative_flips']} ({flips['negative_flip_rate']:.2%}) | {flips['positive_flips']} "
            f"({flips['positive_flip_rate']:.2%}) | {_threshold(thresholds['deployed'])} -> "
            f"{_threshold(thresholds['candidate'])} | {verdict} |")
    for name, r in record["tasks"].items():
        at = r.get("at_own_thresholds")
        if r["status"] == "compared" and at and "at_threshold" in at.get("deployed", {}):
            lines += ["", f"## {name}", "", "| model | P on the split | R on the split | P at deploy prevalence | "
                      "R at deploy prevalence |", "|---|---|---|---|---|"]
            for side in ("deployed", "candidate"):
                split, deploy = at[side]["at_threshold"], at[side].get("deploy") or {}
                lines.append(f"| {side} | {_number(split['precision'], 3)} | {_number(split['recall'], 3)} | "
                             f"{_number(deploy.get('precision'), 3)} | {_number(deploy.get('recall'), 3)} |")
        if r["status"] == "compared" and "per_label" in r["flips"]:
            lines += ["", f"## {name}: per label", "", "| label | AP deployed | AP candidate | threshold change | "
                      "negative flips | positive flips |", "|---|---|---|---|---|---|"]
            per_label = r["at_own_thresholds"]
            for label, flips in r["flips"]["per_label"].items():
                ap_old = per_label["deployed"].get("per_label", {}).get(label, {}).get("ap")
                ap_new = per_label["candidate"].get("per_label", {}).get(label, {}).get("ap")
                drift = (r["threshold_drift"] or {}).get(label)
                lines.append(f"| {label} | {_number(ap_old, 3)} | {_number(ap_new, 3)} | "
                             f"{'-' if drift is None else f'{drift:+.3f}'} | {flips['negative_flips']} | "
                             f"{flips['positive_flips']} |")
        if r["status"] == "compared" and "grade_changes" in r:
            lines += ["", f"## {name}: grades (rows deployed, columns candidate)", "",
                      *(f"    {row}" for row in next(iter(r["grade_changes"].values())))]
    if record["added"] or record["retired"]:
        lines += ["", f"- added tasks: {', '.join(record['added']) or 'none'}",
                  f"- retired tasks: {', '.join(record['retired']) or 'none'}"]
    if "pool" in record:
        pool = record["pool"]
        lines += ["", f"## The pool ({pool['sampled']} images sampled of {', '.join(pool['sources'])}, "
                  f"{pool['undecodable']} undecodable)", "", "| task | images whose decision changes | rate |",
                  "|---|---|---|"]
        lines += [f"| {name} | {c['changed']} | {c['rate']:.2%} |" for name, c in pool["tasks"].items()]
    if record["notes"]:
        lines += ["", "Notes:", *(f"- {note}" for note in record["notes"])]
    notes = [f"- {name}: {r[key]}" for name, r in record["tasks"].items() for key in ("split_note", "metric_note")
             if r.get(key)]
    if notes and not record["notes"]:
        lines += ["", "Notes:"]
    return "\n".join(lines + notes) + "\n"


def pr_figure(path: Path, record: dict, arrays: dict) -> Path | None:
    """Every compared task's precision-recall curve, deployed against candidate (a multi-label
    task pooled over its labels; a graded task is left out: its grades are in the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [name for name in arrays if record["tasks"][name].get("kind") != "graded"]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4.2), squeeze=False)
    for ax, name in zip(axes[0], shown):
        truth = arrays[name]["truth"]
        for side, style in (("deployed", "--"), ("candidate", "-")):
            scores = arrays[name]["scores"][side]
            known = truth >= 0
            precision, recall, _ = pr_curve(scores[known].ravel(), truth[known].ravel())
            ax.plot(recall, precision, style, label=f"{side} {record['tasks'][name][side]:.3f}")
        ax.set(title=f"{name}: {record['tasks'][name]['metric']}", xlabel="recall", ylabel="precision",
               xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(record: dict, arrays: dict, out_dir: Path) -> dict[str, Path]:
    """Write the comparison's files into ``out_dir``; returns them by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, result in record["tasks"].items():
        rows = result.get("flips", {}).get("negative_rows", [])
        if name in arrays and rows:
            data = arrays[name]
            captions = [f"truth {np.asarray(data['truth'][row]).tolist()}\n"
                        f"{_score(data['scores']['deployed'][row])} -> {_score(data['scores']['candidate'][row])}"
                        for row in rows[:SHEET_LIMIT]]
            written[f"{name}_negative_flips"] = contact_sheet([data["paths"][row] for row in rows[:SHEET_LIMIT]],
                                                              captions, out_dir / f"{name}_negative_flips.png")
    figure = pr_figure(out_dir / "pr_curves.png", record, arrays)
    if figure is not None:
        written["pr_curves"] = figure
    _flip_images(record, arrays)
    (out_dir / "compare.json").write_text(json.dumps(json_safe(record), indent=2))
    (out_dir / "compare.md").write_text(markdown(record))
    written.update(json=out_dir / "compare.json", markdown=out_dir / "compare.md")
    return written


def _score(value) -> str:
    value = np.asarray(value)
    return f"{float(value):.2f}" if value.ndim == 0 else f"max {float(value.max()):.2f}"
