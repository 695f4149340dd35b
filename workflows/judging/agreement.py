"""How well AI preference labels agree with human ones, and routing uncertain pairs to people.

``agreement_report(ai_rows, human_rows)`` joins AI labels (``preferences`` rows with
source "ai") to human labels of the same pair — matched on content: the prompt plus the
unordered pair of answers (``pairwise.pair_id`` of the recomputed ``prompt_id``), falling
back to the rows' ``pair_id`` — and measures:

- ``accuracy``: share of matched pairs where the AI's chosen answer is the human's;
- ``order_agreement_rate``: share of matched pairs whose label agreed in both presentation
  orders, and ``accuracy_order_agree``: accuracy restricted to those pairs;
- ``ece``: expected calibration error of the AI's confidence ``p_chosen`` over 10
  equal-width bins of [0, 1] (bin k = [k/10, (k+1)/10), the last one closed):
  Σ_b (n_b / N) · |accuracy_b − mean p_chosen_b|;
- ``per_principle``: accuracy per principle id, a pair counting once for each id in its
  ``principle_ids``.

CLI: ``cai agreement --labels AI.parquet --human HUMAN.jsonl [--out DIR]`` (``main``) prints
a table and writes ``report.md``, ``report.json`` and ``reliability.png`` to DIR.

``dataset_agreement(ai_uri, labels_uri, budget)`` is ``agreement_report`` of two ``preferences``
datasets in bounded memory (hash partitions, ``spill.Spill``), for labels made from the same pairs.

Hybrid routing: ``uncertain(rows, t)`` picks pairs for people, ``export_for_humans`` writes
them as CSV/JSONL with an empty ``human_choice`` column ("1", "2" or "tie"), and
``merge_human_labels`` folds the answers back in.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.errors import ConfigError, DataError
from workflows.core.spill import Budget, Spill
from workflows.judging.human import load_human, require_rows, text_of
from workflows.core.pairwise import pair_id, render_conversation
from workflows.prompt_sources import prompt_id

N_BINS = 10
EXPORT_COLUMNS = ("pair_id", "prompt", "response_1", "response_2", "ai_p_response_1", "human_choice", "notes")


# ---------------------------------------------------------------- matching and metrics

def content_key(row: dict) -> str:
    """The pair id recomputed from the row's prompt and answers (order-independent)."""
    return pair_id(prompt_id(row["prompt"]), text_of(row["chosen"]), text_of(row["rejected"]))


def match(ai_rows: list[dict], human_rows: list[dict]) -> list[tuple[dict, dict]]:
    """(ai, human) row pairs labeling the same prompt and answers."""
    by_key, by_id = {}, {}
    for h in human_rows:
        by_key.setdefault(content_key(h), h)
        by_id.setdefault(h.get("pair_id"), h)
    out = []
    for a in ai_rows:
        h = by_key.get(content_key(a)) or by_id.get(a.get("pair_id"))
        if h is not None:
            out.append((a, h))
    return out


def calibration_bins(confidences: list[float], correct: list[bool], n_bins: int = N_BINS) -> list[dict]:
    """Equal-width bins of [0, 1]: ``{lo, hi, n, confidence, accuracy}`` (means; None if empty)."""
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, p in enumerate(confidences):
        members[min(int(p * n_bins), n_bins - 1)].append(i)
    bins = []
    for k, idx in enumerate(members):
        n = len(idx)
        bins.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "n": n,
                     "confidence": sum(confidences[i] for i in idx) / n if n else None,
                     "accuracy": sum(correct[i] for i in idx) / n if n else None})
    return bins


def expected_calibration_error(bins: list[dict]) -> float | None:
    total = sum(b["n"] for b in bins)
    if not total:
        return None
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def agreement_report(ai_rows: list[dict], human_rows: list[dict]) -> dict:
    """Metrics of AI labels against human labels (see the module docstring).
    Rows with ``source == "human"`` among ``ai_rows`` are ignored."""
    ai_rows = [r for r in ai_rows if r.get("source") != "human"]
    pairs = match(ai_rows, human_rows)
    correct = [text_of(a["chosen"]) == text_of(h["chosen"]) for a, h in pairs]
    agree = [i for i, (a, _) in enumerate(pairs) if a.get("order_agreement") is True]
    bins = calibration_bins([float(a["p_chosen"]) for a, _ in pairs], correct)
    per: dict[str, dict] = {}
    for (a, _), ok in zip(pairs, correct):
        for pid in a.get("principle_ids") or []:
            d = per.setdefault(pid, {"n": 0, "correct": 0})
            d["n"] += 1
            d["correct"] += ok
    for d in per.values():
        d["accuracy"] = d["correct"] / d["n"]
    return {"n_ai": len(ai_rows), "n_human": len(human_rows), "n_matched": len(pairs),
            "n_correct": sum(correct), "accuracy": _rate(sum(correct), len(pairs)),
            "n_order_agree": len(agree), "order_agreement_rate": _rate(len(agree), len(pairs)),
            "accuracy_order_agree": _rate(sum(correct[i] for i in agree), len(agree)),
            "ece": expected_calibration_error(bins), "bins": bins, "per_principle": dict(sorted(per.items()))}


# ---------------------------------------------------------------- two datasets, in bounded memory

_AI_COLUMNS = ["pair_id", "chosen", "p_chosen", "order_agreement", "principle_ids", "source"]


def _tables(uri: str, columns: list[str], batch_size: int = 8192):
    for f in storage.list_files(uri, ".parquet"):
        fs, path = storage.resolve(f)
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([batch])


def _chosen_digests(chosen: pa.ChunkedArray) -> pa.Array:
    """128-bit digests of each row's chosen answer (``text_of``: its last message's content), so a
    partition compares answers without holding their text."""
    arr = chosen.combine_chunks() if isinstance(chosen, pa.ChunkedArray) else chosen
    last = arr.offsets.to_numpy()[1:] - 1
    texts = arr.values.field("content").take(pa.array(last)).to_pylist()
    return pa.array([hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts], pa.binary(16))


def dataset_agreement(ai_uri: str, labels_uri: str, budget: Budget = Budget()) -> dict:
    """``agreement_report`` of the AI labels in ``ai_uri`` against the labels in ``labels_uri`` (both
    ``preferences`` datasets), the same keys and figures, without holding either in memory: both
    go to hash partitions by pair id (``spill.Spill``), each partition is joined on its own. Rows
    are matched on ``pair_id`` — what ``match`` finds for labels made from the same pairs, whose
    pair ids are their content keys (``content_key``); answers are compared by 128-bit digest. The
    calibration sums are added up per partition, so ``ece`` may differ from ``agreement_report``'s
    in the last bits of a float."""
    rows = sum(pq.read_metadata(p, filesystem=fs).num_rows for fs, p in
               (storage.resolve(f) for u in (ai_uri, labels_uri) for f in storage.list_files(u, ".parquet")))
    parts = budget.parts_for(2 * rows)  # an AI row carries a digest, p, principle ids besides its id
    n_ai = n_human = 0
    total = {"n_matched": 0, "n_correct": 0, "n_order_agree": 0, "correct_agree": 0}
    n_bin, conf_bin, correct_bin = np.zeros(N_BINS, np.int64), np.zeros(N_BINS), np.zeros(N_BINS, np.int64)
    per: dict[str, dict] = {}
    with Spill(parts, budget) as sp:
        for t in _tables(labels_uri, ["pair_id", "chosen"]):
            n_human += t.num_rows
            sp.add("human", pa.table({"id": t["pair_id"], "chosen": _chosen_digests(t["chosen"])}))
        for t in _tables(ai_uri, _AI_COLUMNS):
            t = t.filter(pc.invert(pc.fill_null(pc.equal(t["source"], "human"), False)))
            n_ai += t.num_rows
            sp.add("ai", pa.table({"id": t["pair_id"], "chosen": _chosen_digests(t["chosen"]), "p": t["p_chosen"],
                                   "agree": t["order_agreement"], "principles": t["principle_ids"]}))
        for p in range(parts):
            human, ai = sp.read("human", p), sp.read("ai", p)
            at = pc.index_in(ai["id"], value_set=human["id"])
            hit = pc.is_valid(at)
            m = ai.filter(hit)
            correct = pc.equal(m["chosen"], human["chosen"].take(at.filter(hit))).to_numpy(zero_copy_only=False)
            agree = pc.fill_null(m["agree"], False).to_numpy(zero_copy_only=False)
            conf = m["p"].to_numpy().astype(np.float64)
            k = np.minimum((conf * N_BINS).astype(np.int64), N_BINS - 1)
            n_bin += np.bincount(k, minlength=N_BINS)
            conf_bin += np.bincount(k, weights=conf, minlength=N_BINS)
            correct_bin += np.bincount(k, weights=correct, minlength=N_BINS).astype(np.int64)
            total["n_matched"] += m.num_rows
            total["n_correct"] += int(correct.sum())
            total["n_order_agree"] += int(agree.sum())
            total["correct_agree"] += int((correct & agree).sum())
            principles = m["principles"].combine_chunks() if m.num_rows else pa.array([], pa.list_(pa.string()))
            parents = pc.list_parent_indices(principles).to_numpy()
            by = pa.table({"pid": pc.list_flatten(principles), "ok": pa.array(correct[parents], pa.bool_())})
            for g in by.group_by("pid").aggregate([("ok", "count"), ("ok", "sum")]).to_pylist():
                d = per.setdefault(g["pid"], {"n": 0, "correct": 0})
                d["n"] += int(g["ok_count"])
                d["correct"] += int(g["ok_sum"])
    for d in per.values():
        d["accuracy"] = d["correct"] / d["n"]
    bins = [{"lo": b / N_BINS, "hi": (b + 1) / N_BINS, "n": int(n),
             "confidence": float(conf_bin[b]) / n if n else None, "accuracy": int(correct_bin[b]) / n if n else None}
            for b, n in enumerate(n_bin.tolist())]
    n, c, n_agree = total["n_matched"], total["n_correct"], total["n_order_agree"]
    return {"n_ai": n_ai, "n_human": n_human, "n_matched": n, "n_correct": c, "accuracy": _rate(c, n),
            "n_order_agree": n_agree, "order_agreement_rate": _rate(n_agree, n),
            "accuracy_order_agree": _rate(total["correct_agree"], n_agree),
            "ece": expected_calibration_error(bins), "bins": bins, "per_principle": dict(sorted(per.items()))}


# ---------------------------------------------------------------- output

def plot_reliability(report: dict, uri: str) -> None:
    """Reliability diagram (accuracy vs confidence per bin, with the diagonal) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    full = [b for b in report["bins"] if b["n"]]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=1 / N_BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="AI confidence (p_chosen)", ylabel="agreement with humans",
           title=f"Reliability (ECE {_fmt(report['ece'])}, n={report['n_matched']})")
    ax.legend(loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_report(r: dict) -> str:
    """The report as a markdown document (also readable as plain text)."""
    lines = ["# AI vs human preference agreement", "",
             f"{r['n_matched']} matched pairs ({r['n_ai']} AI labels, {r['n_human']} human labels)", "",
             "| metric | value |", "|---|---|",
             f"| accuracy (AI choice = human choice) | {_fmt(r['accuracy'])} ({r['n_correct']}/{r['n_matched']}) |",
             f"| agreement in both orders | {_fmt(r['order_agreement_rate'])} ({r['n_order_agree']}/{r['n_matched']}) |",
             f"| accuracy when both orders agree | {_fmt(r['accuracy_order_agree'])} |",
             f"| expected calibration error (10 bins) | {_fmt(r['ece'])} |", ""]
    if r["per_principle"]:
        lines += ["| principle | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {pid} | {d['n']} | {_fmt(d['accuracy'])} |" for pid, d in r["per_principle"].items()]
        lines.append("")
    lines += ["![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)


def read_preferences(path: str) -> list[dict]:
    """``preferences`` rows from a parquet file or dataset directory (local or s3://)."""
    if not storage.exists(path):
        raise ConfigError(path, "not found", "point --labels at the preferences parquet file or directory")
    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs).to_pylist()


def _parent(uri: str) -> str:
    if storage.is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri.rstrip("/")))


def main(labels_path: str, human_path: str, out_dir: str | None = None) -> int:
    """``cai agreement``: print the report; write report.md/.json and reliability.png to out_dir."""
    ai_rows = read_preferences(labels_path)
    human_rows, errors = load_human(human_path)
    require_rows(human_rows, errors, human_path)
    report = agreement_report(ai_rows, human_rows)
    text = format_report(report)
    print(text.replace("![reliability diagram](reliability.png)", "").rstrip())
    if errors:
        print(f"\n{len(errors)} human row(s) skipped, e.g. {errors[0]['id']}: {errors[0]['reason']} {errors[0]['detail']}")
    out = out_dir or storage.join(_parent(labels_path), "agreement")
    storage.write_text(storage.join(out, "report.md"), text)
    storage.write_json(storage.join(out, "report.json"), {**report, "human_errors": errors})
    plot_reliability(report, storage.join(out, "reliability.png"))
    print(f"\nwrote {storage.join(out, 'report.md')} and reliability.png")
    if not report["n_matched"]:
        print("warning: no AI label matched a human label (same prompt and the same two answers)")
        return 1
    return 0


# ---------------------------------------------------------------- hybrid routing

def uncertain(rows: list[dict], threshold: float) -> list[dict]:
    """Rows a person should look at: |p_chosen − 0.5| < threshold, or the two orders disagreed."""
    return [r for r in rows if abs(float(r["p_chosen"]) - 0.5) < threshold or r.get("order_agreement") is False]


def _ordered(row: dict) -> tuple[str, str, float]:
    """(response_1, response_2, AI P(response_1)): answers in text order, hiding the AI's pick."""
    c, r, p = text_of(row["chosen"]), text_of(row["rejected"]), float(row["p_chosen"])
    return (c, r, p) if c <= r else (r, c, 1.0 - p)


def export_for_humans(rows: list[dict], path: str) -> int:
    """Write rows for review as .csv or .jsonl with ``EXPORT_COLUMNS``; returns the row count."""
    out = []
    for row in rows:
        r1, r2, p1 = _ordered(row)
        out.append({"pair_id": row["pair_id"], "prompt": render_conversation(row["prompt"]), "response_1": r1,
                    "response_2": r2, "ai_p_response_1": round(p1, 4), "human_choice": "", "notes": ""})
    ext = Path(path).suffix.lower()
    if ext == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(out)
        storage.write_text(path, buf.getvalue())
    elif ext == ".jsonl":
        storage.write_text(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    else:
        raise ConfigError(path, f"unsupported export type {ext or '(none)'!r}", "name the file .csv or .jsonl")
    return len(out)


def _read_labeled(path: str) -> list[dict]:
    text = storage.read_text(path)
    if Path(path).suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _norm(text) -> str:
    return str(text).replace("\r\n", "\n").strip()


def merge_human_labels(rows: list[dict], labeled_path: str) -> tuple[list[dict], list[dict]]:
    """Replace AI labels with the human answers in ``labeled_path`` (an ``export_for_humans``
    file). ``human_choice`` "1"/"2" → the row becomes source/judge "human", p_chosen 1.0,
    order_agreement null, principle_ids []; "tie" → the row leaves the output and becomes
    an error ``{id: pair_id, stage: "human_review", reason: "human_tie"}``; empty → the AI
    label stays. Unknown pair ids, repeated pair ids, changed answer texts or other
    choices raise ``DataError`` naming the file and record (1-based, header not counted).
    Returns (rows, errors)."""
    by_id = {r["pair_id"]: r for r in rows}
    decided: dict[str, str] = {}
    for k, rec in enumerate(_read_labeled(labeled_path), start=1):
        where = f"{labeled_path}: record {k}"
        pid, choice = str(rec.get("pair_id") or ""), str(rec.get("human_choice") or "").strip().lower()
        if pid not in by_id:
            raise DataError(f"{where}: unknown pair_id {pid!r} — it is not among the rows being merged")
        if pid in decided:
            raise DataError(f"{where}: pair_id {pid} appears twice — keep one record per pair")
        shown = [_norm(rec.get(c)) for c in ("response_1", "response_2") if rec.get(c) is not None]
        if shown and shown != [_norm(t) for t in _ordered(by_id[pid])[:len(shown)]]:
            raise DataError(f"{where}: response_1/response_2 differ from the exported answers — do not edit them")
        if choice not in ("", "1", "2", "tie"):
            raise DataError(f"{where}: human_choice {rec.get('human_choice')!r} — write 1, 2, tie, or leave it empty")
        if choice:
            decided[pid] = choice
    out, errors = [], []
    for row in rows:
        choice = decided.get(row["pair_id"])
        if choice == "tie":
            errors.append({"id": row["pair_id"], "stage": "human_review", "reason": "human_tie",
                           "detail": f"marked as a tie in {labeled_path}"})
            continue
        if choice:
            r1, r2, _ = _ordered(row)
            chosen, rejected = (r1, r2) if choice == "1" else (r2, r1)
            row = {**row, "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}], "p_chosen": 1.0,
                   "source": "human", "judge": "human", "order_agreement": None, "principle_ids": []}
        out.append(row)
    return out, errors
