"""Human-readable summaries: one per stage (``<stage>/summary.md`` + console) and one per run."""
from __future__ import annotations

import pyarrow.parquet as pq

from workflows.core import console, storage


def clip(text: str | None, n: int = 400) -> str:
    text = (text or "").strip().replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def stage_lines(info: dict) -> list[str]:
    secs = max(float(info.get("seconds", 0)), 1e-9)
    lines = [info["headline"]] if info.get("headline") else []  # a stage's one-line outcome, first
    skipped = f", skipped {info['skipped']}" if info.get("skipped") else ""
    lines += [f"rows in {info['inputs']}, out {info['outputs']}{skipped}, errors {info['errors']} "
              f"in {info.get('seconds', 0):.1f} s ({info['outputs'] / secs:.2f} rows/s)"]
    gen = info.get("metrics", {}).get("_gen_tokens")
    if gen:
        lines.append(f"generated tokens {int(gen)} ({gen / secs:.1f} tokens/s)")
    if info.get("unreadable_files"):
        lines.append(f"repaired: {info['unreadable_files']} unreadable file(s) (cut short or corrupted) set aside as "
                     "*.unreadable; their work was redone")
    if info.get("skipped_by_reason"):  # left out on purpose, by the recipe's settings: not errors
        lines.append("skipped by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(info["skipped_by_reason"].items())))
    if info.get("errors_by_reason"):
        lines.append("errors by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(info["errors_by_reason"].items())))
    lines += engine_lines(info.get("engines") or [])
    if info.get("datasets"):
        lines.append("datasets: " + ", ".join(f"{k} ({v} rows)" for k, v in info["datasets"].items()))
    return lines


def engine_lines(engines: list[dict]) -> list[str]:
    """One line per kind of engine: engines on the same device and number format, for the same
    reasons (the evaluation's six models, say), share a line."""
    groups: dict[tuple, list[dict]] = {}
    for e in engines:
        key = (", ".join(x for x in (e.get("device"), e.get("dtype")) if x), e.get("dtype_reason"), e.get("backend_reason"))
        groups.setdefault(key, []).append(e)
    lines = []
    for (where, why, backend), group in groups.items():
        actors = sum(e["actors"] for e in group)
        more = [f"{actors} actor{'s' if actors != 1 else ''}"]
        loads = [e["load_s"] for e in group if e.get("load_s") is not None]
        if loads:
            more.append(f"loaded in {min(loads):.1f} s" if len(loads) == 1 or min(loads) == max(loads)
                        else f"loaded in {min(loads):.1f}–{max(loads):.1f} s")
        if backend:
            more.append(f"backend: {backend}")
        names = ", ".join(e["engine"] for e in group)
        lines.append(f"engine{'s' if len(group) > 1 else ''} {names}" + (f" on {where}" if where else "")
                     + (f" — {why}" if why else "") + f" ({'; '.join(more)})")
    return lines


def before_after_examples(sl_cai_uri: str, n: int = 3) -> list[dict]:
    """A few rows whose revision changed the answer (falls back to any rows)."""
    files = storage.list_files(sl_cai_uri, ".parquet")
    if not files:
        return []
    fs, path = storage.resolve(files[0])
    rows = pq.read_table(path, filesystem=fs).slice(0, 50).to_pylist()
    changed = [r for r in rows if r["initial_response"] != r["final_response"]] or rows
    return changed[:n]


def examples_md(examples: list[dict]) -> list[str]:
    out = []
    for ex in examples:
        prompt = next((m["content"] for m in reversed(ex["messages"]) if m["role"] == "user"), "")
        out += [f"### {ex['prompt_id']}", f"- **prompt**: {clip(prompt)}",
                f"- **before**: {clip(ex['initial_response'])}"]
        for i, r in enumerate(ex.get("rounds") or [], 1):
            out += [f"- **round {i} principle** `{r['principle_id']}` — critique: {clip(r['critique'], 300)}"]
        out += [f"- **after**: {clip(ex['final_response'])}", ""]
    return out


def write_stage_summary(ctx, info: dict, examples: list[dict] | None = None) -> str:
    lines = [f"# Stage `{ctx.name}`", "", *[f"- {line}" for line in stage_lines(info)], ""]
    if examples:
        lines += ["## Before / after examples", "", *examples_md(examples)]
    text = "\n".join(lines)
    storage.write_text(ctx.path("summary.md"), text + "\n")
    console.say("\n".join([f"\n== {ctx.name} ==", *(f"  {line}" for line in stage_lines(info))]))
    return text


def run_summary(run_dir: str, recipe_name: str, infos: dict[str, dict]) -> str:
    """Top-level ``summary.md`` of a run: each stage's own summary (counts, errors by reason,
    training figures, before/after examples) and where its datasets are."""
    lines = [f"# Run `{recipe_name}`", "", f"Run directory: `{run_dir}`", ""]
    for name, info in infos.items():
        lines.append(f"## {name}")
        stage_md = storage.join(run_dir, name, "summary.md")
        body = storage.read_text(stage_md).splitlines()[1:] if storage.exists(stage_md) else []
        # the stage's own summary, its headings one level down; or the counts alone
        lines += [("#" + x if x.startswith("#") else x) for x in body if x.strip()] or \
            [f"- {line}" for line in stage_lines(info)]
        lines += [f"- `{storage.join(run_dir, name, ds)}`" for ds in info.get("datasets", {})]
        lines.append("")
    text = "\n".join(lines)
    storage.write_text(storage.join(run_dir, "summary.md"), text + "\n")
    return text
