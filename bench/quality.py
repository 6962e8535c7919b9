"""Quality vs ratio for every method in the registry, on the bundled SmolLM2-135M-Instruct.

Structured methods at 10/20/25/30 % of all parameters (quick: 20 %), mask methods at 50 %, 2:4 and 4:8
(quick: 2:4), the composed method at 20 % + 2:4; WikiText-2 and PTB perplexity (quick: the first 24 test
windows of 512 tokens; full: the whole test sets at 2048), and zero-shot accuracy through
lm-evaluation-harness (acc_norm where a task has it, else acc; quick: each task's first 20 items; on the
original and on every method at 20 % / 2:4) with its mean and the share of the original's mean retained.

    COMP_DATA_DIR=../shared/data python bench/quality.py --quick --out bench-out
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import plotly.graph_objects as go  # noqa: E402
from common import (command_line, CALIBRATION, Section, bundled, eval_protocol, machine, main_for, markdown_table,  # noqa: E402
                    measure, ppl, save_figure)

from comp_core.methods import get_method, method_names  # noqa: E402
from comp_core.runtime import count_parameters  # noqa: E402

DATASETS = ("wikitext2", "ptb")
# quick mode (the whole bench under an hour on 2 cores): one structured ratio and the N:M pattern a GPU
# accelerates; the ablations add COMP at 30 %, docs/methods.md's mask table every mask method at 50 % and 4:8
QUICK_RATIOS = [0.2]
QUICK_PATTERNS = ["2:4"]
QUICK_TASK_LIMIT = 20
ZERO_SHOT_BATCH = 16  # the harness's batch: 2.2x faster than 1 on 2 cores (31 vs 69 s for 5 tasks × 20 items)


def targets(quick: bool) -> dict[str, list[dict]]:
    """Settings per method: structured at every ratio, masks at every pattern, composed at 20 % + 2:4."""
    ratios = QUICK_RATIOS if quick else [0.1, 0.2, 0.25, 0.3]
    patterns = QUICK_PATTERNS if quick else ["0.5", "2:4", "4:8"]
    out = {}
    for name in method_names():
        kind = get_method(name).kind
        if kind == "structured":
            out[name] = [{"ratio": r} for r in ratios]
        elif kind == "unstructured":
            out[name] = [{"sparsity": p} for p in patterns]
        else:
            out[name] = [{"ratio": 0.2, "sparsity": "2:4"}]
    return out


def headline_target(settings: dict) -> bool:
    """The runs that also get zero-shot accuracy: 20 % structured, 2:4 masks, the composed run."""
    return settings.get("ratio") in (0.2, None) and settings.get("sparsity") in ("2:4", None)


def zero_shot(model, tasks: list[str], limit: int | None) -> dict[str, float]:
    from comp_core.evaluate.zeroshot import evaluate_tasks

    return evaluate_tasks(model, bundled().tokenizer, tasks, limit=limit, batch_size=ZERO_SHOT_BATCH,
                          quiet=True).headline()


def target_label(settings: dict) -> str:
    parts = [f"{settings['ratio']:.0%}"] if "ratio" in settings else []
    return " + ".join(parts + ([settings["sparsity"]] if "sparsity" in settings else []))


def run(quick: bool, out: Path) -> Section:
    from comp_core.evaluate.zeroshot import harness_installed, runnable_tasks

    tasks = runnable_tasks() if harness_installed() else []
    limit = QUICK_TASK_LIMIT if quick else None
    original = bundled().model
    base = {"method": "original", "target": "0%", "realised_ratio": 0.0, "params_after": count_parameters(original),
            "ppl": {ds: ppl(original, ds, quick=quick, full_seq_len=not quick) for ds in DATASETS},
            "accuracy": zero_shot(original, tasks, limit) if tasks else {}, "prune_seconds": 0.0}
    rows = [base]
    for name, runs in targets(quick).items():
        for settings in runs:
            print(f"[quality] {name} {target_label(settings)}", file=sys.stderr, flush=True)
            wants_accuracy = bool(tasks) and headline_target(settings)
            try:
                row = measure(name, quick=quick, datasets=() if not quick else DATASETS, keep_model=True,
                              **settings)
            except ValueError as err:  # a ratio the method cannot reach
                rows.append({"method": name, "target": target_label(settings), "error": str(err)})
                continue
            model = row.pop("model")
            if not quick:  # the papers' protocol: whole test sets at 2048
                row["ppl"] = {ds: ppl(model, ds, quick=False, full_seq_len=True) for ds in DATASETS}
            row["accuracy"] = zero_shot(model, tasks, limit) if wants_accuracy else {}
            row["target"] = target_label(settings)
            row["kind"] = get_method(name).kind
            rows.append(row)
            del model
            gc.collect()
    return Section(name="quality", title="Quality vs ratio, every method",
                   markdown=_markdown(rows, tasks, quick, limit), data={"rows": rows, "tasks": tasks},
                   figures=save_figure(_figure(rows), out, "quality_ppl_vs_ratio"))


def _mean(accuracy: dict[str, float]) -> float | None:
    return sum(accuracy.values()) / len(accuracy) if accuracy else None


def _markdown(rows: list[dict], tasks: list[str], quick: bool, limit: int | None) -> str:
    base_mean = _mean(rows[0]["accuracy"])
    head = (["method", "target", "realised", "zeros of all"] + [f"ppl {ds}" for ds in DATASETS]
            + [f"acc {t}" for t in tasks] + (["mean acc", "retained"] if tasks else []) + ["prune s"])
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["method"], r["target"], "—", "—"] + ["—"] * (len(head) - 5) + [r["error"][:50]])
            continue
        mean = _mean(r.get("accuracy") or {})
        zeros = r.get("extra", {}).get("zero_share")
        body.append([r["method"], r["target"], f"{r['realised_ratio']:.2%}",
                     f"{zeros:.1%}" if zeros is not None else "—"]
                    + [r["ppl"].get(ds) for ds in DATASETS]
                    + [f"{r['accuracy'][t]:.3f}" if t in (r.get("accuracy") or {}) else "—" for t in tasks]
                    + ([f"{mean:.3f}" if mean is not None else "—",
                        f"{mean / base_mean:.1%}" if mean is not None and base_mean else "—"] if tasks else [])
                    + [f"{r['prune_seconds']:.1f}"])
    cal = CALIBRATION
    zs = (f"Zero-shot: lm-evaluation-harness, {', '.join(tasks)}, "
          f"{'first ' + str(limit) + ' items of each' if limit else 'all items'}, acc_norm where the task has it "
          f"(piqa, arc_easy, hellaswag), else acc; on the original and every method at 20 % / 2:4; 'retained' = "
          "mean accuracy / the original's." if tasks else "Zero-shot: lm-eval not installed, no accuracy.")
    noise = ""
    if tasks and limit:
        item_se = (0.25 / limit) ** 0.5  # binomial standard error of one task's accuracy at p = 0.5
        noise = (f" **At {limit} items per task these accuracies are mostly noise**: one task's standard error is "
                 f"≈ {item_se:.2f}, the mean's ≈ {item_se / len(tasks) ** 0.5:.2f}, so differences in mean accuracy "
                 f"below ≈ {2 * item_se / len(tasks) ** 0.5:.2f} (and 'retained' above 100 %) say nothing; the full "
                 "run scores every item.")
    return "\n\n".join([
        command_line("quality", quick),
        f"Bundled SmolLM2-135M-Instruct; calibration {cal['name']} {cal['n_samples']}×{cal['seq_len']} tokens, "
        f"seed {cal['seed']} (every method on the same sample); perplexity: {eval_protocol(quick)}. Realised ratio "
        "= share of all parameters removed; mask methods remove none ('zeros of all' = share of all parameters "
        "that are zero). " + zs + noise,
        markdown_table(head, body), f"Machine: {machine()}."])


def _figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    base = rows[0]["ppl"]["wikitext2"]
    fig.add_hline(y=base, line_dash="dot", annotation_text=f"original {base:.2f}")
    by_method: dict[str, list[dict]] = {}
    for r in rows[1:]:
        if "error" not in r and r.get("kind") == "structured":
            by_method.setdefault(r["method"], []).append(r)
    for name, runs in by_method.items():
        runs.sort(key=lambda r: r["realised_ratio"])
        fig.add_trace(go.Scatter(x=[r["realised_ratio"] for r in runs], y=[r["ppl"]["wikitext2"] for r in runs],
                                 mode="lines+markers", name=name))
    fig.update_layout(title="WikiText-2 perplexity vs realised ratio (structured methods)",
                      xaxis_title="share of all parameters removed", yaxis_title="perplexity", yaxis_type="log",
                      xaxis_tickformat=".0%", template="plotly_white")
    return fig


if __name__ == "__main__":
    main_for(run)
