"""The ``preference`` stage's public outputs, written by streaming (memory flat in the row count):

- ``preferences/``: every AI label (``_judging/labels``, PREFERENCES_SCHEMA columns), or — with
  ``human`` and/or ``revisions`` set — AI, human and revision rows in the configured proportions
  (``mix_plan`` of ``workflows.judging.human``): an AI row whose pair also has a given label is
  dropped (the given label wins), then the scarcest source is kept whole and the others
  subsampled without replacement, deterministically (selection sampling: one pass, O(1) memory);
- ``errors/``: the sampling errors (written by finalize), plus part files appended here for
  sample notes (``samples-*``), judging errors (``judging-*``), unusable human rows (``human-*``)
  and sl_cai rows that made no revision pair (``revision-*``);
- ``report.md`` with ``p_chosen.png`` and ``principles.png``; the gold gate's figures and the
  agreement with a pairs file's own choices, when there are any, also in ``summary.md``.

Per-principle figures (a pair counts once per principle it was judged under; p = P(the
finally chosen response is better) under that principle alone, order- and judge-averaged):
``confidence`` = mean 2·|p − 0.5| (0 = coin flip, 1 = certain); ``sides_with_ensemble`` =
share with p > 0.5, i.e. the principle alone picks the ensemble's choice; ``order_agreement``
= share where both presentation orders prefer the same response.
"""
from __future__ import annotations

import hashlib
import io
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.core import console, storage, summary
from workflows.core.stage import ERRORS_SCHEMA, _RollingWriter, num_rows
from workflows.judging.gold import describe
from workflows.judging.human import PREFERENCES_SCHEMA, load_human, mix_plan, to_table

BINS = 10  # p_chosen histogram over [0.5, 1.0]


def load_human_data(human, stage_name: str) -> tuple[list[dict], list[dict]]:
    """(rows, errors) of the configured human data; errors carry stage ``<name>:human``."""
    return load_human(human.path, split=human.split, limit=human.limit, stage=f"{stage_name}:human")


def iter_tables(uri: str, columns: list[str] | None = None, batch_size: int = 8192):
    for f in storage.list_files(uri, ".parquet"):
        fs, path = storage.resolve(f)
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([batch])


class LabelStats:
    """Streaming aggregates of AI labels: p_chosen histogram, order agreement, per principle."""

    def __init__(self):
        self.n, self.p_sum, self.hist = 0, 0.0, [0] * BINS
        self.agree = {True: 0, False: 0, None: 0}
        self.per: dict[str, list] = {}  # id → [n, confidence sum, sides with ensemble, agree, agree denominator]

    def update(self, t: pa.Table) -> None:
        cols = t.select(["p_chosen", "order_agreement", "principle_ids", "principle_p_chosen",
                         "principle_agree"]).to_pydict()
        for p, ag, pids, pps, pags in zip(*cols.values()):
            self.n, self.p_sum = self.n + 1, self.p_sum + p
            self.hist[min(max(int((p - 0.5) * 2 * BINS), 0), BINS - 1)] += 1
            self.agree[ag] += 1
            for pid, pp, pag in zip(pids, pps, pags):
                d = self.per.setdefault(pid, [0, 0.0, 0, 0, 0])
                d[0], d[1], d[2] = d[0] + 1, d[1] + 2 * abs(pp - 0.5), d[2] + (pp > 0.5)
                if pag is not None:
                    d[3], d[4] = d[3] + bool(pag), d[4] + 1

    def summary(self) -> dict:
        tested = self.agree[True] + self.agree[False]
        return {"labels": self.n, "mean_p_chosen": self.p_sum / self.n if self.n else None,
                "order_agreement_rate": self.agree[True] / tested if tested else None,
                "p_chosen_hist": {f"{0.5 + k / (2 * BINS):.2f}": c for k, c in enumerate(self.hist)},
                "per_principle": {pid: {"n": d[0], "confidence": d[1] / d[0], "sides_with_ensemble": d[2] / d[0],
                                        "order_agreement": d[3] / d[4] if d[4] else None}
                                  for pid, d in sorted(self.per.items())}}


def _rng(seed: int, salt: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"mix:{salt}:{seed}".encode()).digest()[:8], "big"))


def select_stream(n: int, k: int, rng: random.Random):
    """Selection sampling (Knuth's Algorithm S): yields n booleans, exactly k True, uniformly."""
    for seen in range(n):
        take = k > 0 and rng.random() * (n - seen) < k
        k -= take
        yield take


def assemble(ctx, labels_uri: str, notes_name: str, judge_errors_uri: str, given: dict[str, tuple]) -> dict:
    """Write ``preferences`` (AI labels, mixed by ratio with the ``given`` sources — ``{name: (rows,
    errors, ratio)}``, e.g. human and revision rows) and the appended ``errors`` parts; gather label
    stats. An AI label whose pair a given source also labels is dropped first (the given label wins)."""
    stats, writer = LabelStats(), _RollingWriter(ctx.path("preferences"))
    given_ids = pa.array(sorted({r["pair_id"] for rows, _, _ in given.values() for r in rows}), pa.string())
    mix = keep = None
    picked: dict[str, list[int]] = {}
    if given:
        n_ai = over = 0
        for t in iter_tables(labels_uri, ["pair_id"]):
            n_ai, over = n_ai + t.num_rows, over + pc.sum(pc.is_in(t["pair_id"], value_set=given_ids)).as_py()
        plan = mix_plan(n_ai - over, {name: (len(rows), ratio) for name, (rows, _, ratio) in given.items()})
        keep = select_stream(n_ai - over, plan["ai"], _rng(ctx.seed, "ai"))
        picked = {name: sorted(_rng(ctx.seed, name).sample(range(len(rows)), plan[name]))
                  for name, (rows, _, _) in given.items()}
        total = sum(plan.values())
        mix = {"ai_in": n_ai, "ai_kept": plan["ai"], "ai_overridden_by_human": over}
        for name, (rows, errors, ratio) in given.items():
            mix.update({f"{name}_ratio": ratio, f"actual_{name}_ratio": plan[name] / total if total else 0.0,
                        f"{name}_in": len(rows), f"{name}_kept": plan[name], f"{name}_errors": len(errors)})
        mix["sources"] = list(given)
    for t in iter_tables(labels_uri):
        stats.update(t)
        t = t.select(PREFERENCES_SCHEMA.names)
        if keep is not None:
            fresh = pc.invert(pc.is_in(t["pair_id"], value_set=given_ids)).to_pylist()
            t = t.filter(pa.array([ok and next(keep) for ok in fresh], pa.bool_()))
        writer.write(t)
    for name, (rows, _, _) in given.items():
        if picked[name]:
            writer.write(to_table([rows[i] for i in picked[name]]))
    n_pref = writer.total
    writer.close()
    if n_pref == 0:
        writer.write(PREFERENCES_SCHEMA.empty_table())
        writer.close()
    errors_uri = ctx.path("errors")
    notes = append_parts(ctx.path(notes_name), errors_uri, "samples")
    append_parts(judge_errors_uri, errors_uri, "judging")
    for name, (_, errors, _) in given.items():
        if errors:
            _write(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), storage.join(errors_uri, f"{name}-00000.parquet"))
    n_err = num_rows(errors_uri)
    return {"preferences": n_pref, "errors": n_err, "mix": mix, "stats": stats, "notes_by_reason": notes}


def _write(table: pa.Table, uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def append_parts(src_uri: str, dst_uri: str, prefix: str) -> dict[str, int]:
    """Copy the non-empty parquet files of ``src_uri`` into ``dst_uri`` as ``<prefix>-NNNNN.parquet``
    (streamed); returns counts by ``reason``."""
    reasons: dict[str, int] = {}
    for k, f in enumerate(storage.list_files(src_uri, ".parquet")):
        if num_rows(f) == 0:
            continue
        fs, path = storage.resolve(storage.join(dst_uri, f"{prefix}-{k:05d}.parquet"))
        with pq.ParquetWriter(path, ERRORS_SCHEMA, filesystem=fs) as w:
            for t in iter_tables(f):
                w.write_table(t.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA))
                for r, c in zip(*pc.value_counts(t["reason"]).flatten()):
                    reasons[r.as_py()] = reasons.get(r.as_py(), 0) + c.as_py()
    return reasons


# ---------------------------------------------------------------- report

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_hist(s: dict, uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.bar([float(k) for k in s["p_chosen_hist"]], list(s["p_chosen_hist"].values()), width=0.5 / BINS,
           align="edge", edgecolor="black", alpha=0.75)
    ax.set(xlim=(0.5, 1.0), xlabel="p_chosen (soft label)", ylabel="pairs",
           title=f"AI labels (n={s['labels']}, order agreement {_fmt(s['order_agreement_rate'])})")
    storage.write_bytes(uri, _png(fig))


def plot_principles(s: dict, uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = s["per_principle"]
    names, series = list(per), ("confidence", "sides_with_ensemble", "order_agreement")
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * max(len(names), 2) + 1.2), dpi=100)
    for k, key in enumerate(series):
        ax.barh([i + (k - 1) * 0.27 for i in range(len(names))], [per[n][key] or 0.0 for n in names],
                height=0.27, label=key.replace("_", " "))
    if s["order_agreement_rate"] is not None:
        ax.axvline(s["order_agreement_rate"], color="gray", ls="--", label="overall order agreement")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlim=(0, 1), xlabel="share / mean", title="Per principle")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7)
    storage.write_bytes(uri, _png(fig))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _source_lines(info: dict) -> tuple[str, list[str]]:
    """(who made the pairs, their table rows): the policy's samples, or a pairs file."""
    ph = info["phases"]
    if "pairs_from" in ph:
        p = ph["pairs_from"]
        return (f"Pairs read from `{p['file']}` (no policy sampled)",
                [f"| pair rows read | {p['rows']} ({p['row_errors']} unusable, in errors) |",
                 f"| pairs | {ph['judging']['pairs']} ({p['with_dataset_label']} with the dataset's own choice) |",
                 f"| reading pairs | {p['seconds']:.1f} s |"])
    p = ph["sampling"]
    return (f"Policy `{info['policy']}`",
            [f"| prompts | {p['prompts']} ({p['prompt_errors']} without a pair) |",
             f"| pairs | {ph['judging']['pairs']} |", f"| sampling | {p['seconds']:.1f} s |"])


def gold_lines(g: dict | None) -> list[str]:
    """The gold gate in the report and the summary (``gold.describe`` figures and the outcome)."""
    if not g:
        return []
    limits = f"min_agreement {g['min_agreement']}, max_position_bias {g.get('max_position_bias')}"
    verdict = (f"passed ({limits})" if g.get("passed") else
               f"FAILED ({limits}; labeled anyway, on_gold_fail: warn)")
    skipped = f"; {g['rows_skipped']} gold row(s) unusable" if g.get("rows_skipped") else ""
    return [f"Gold gate {verdict} on `{g['file']}`: {describe(g)}{skipped}."]


def dataset_lines(d: dict | None) -> list[str]:
    """Agreement of the AI labels with the choice the pairs file itself made."""
    if not d:
        return []
    ci = f" (95% CI {_fmt(d['accuracy_lo'])}–{_fmt(d['accuracy_hi'])})" if d["n_matched"] else ""
    return [f"Agreement with the dataset's own choice: {_fmt(d['accuracy'])}{ci}, {d['n_correct']} of "
            f"{d['n_matched']} labeled pairs; when both orders agree {_fmt(d['accuracy_order_agree'])}; "
            f"ECE {_fmt(d['ece'])}."]


def _paragraphs(lines: list[str]) -> list[str]:
    """Each line followed by a blank one (markdown paragraphs)."""
    return [x for line in lines for x in (line, "")]


def write_report(ctx, info: dict, stats: LabelStats) -> str:
    s, ph = stats.summary(), info["phases"]
    looked = info["cache_hits"] + info["cache_misses"]
    source, source_rows = _source_lines(info)
    lines = [f"# Preference labels: `{ctx.name}`", "",
             f"{source}, judge(s) {', '.join(f'`{j}`' for j in info['judges'])}, constitution "
             f"`{info['constitution']}`, {info['principles_per_pair']} principle(s) per pair, "
             f"{'both orders' if info['both_orders'] else 'one order'}{', chain of thought' if info['cot'] else ''}.", "",
             *_paragraphs(gold_lines(info.get("gold"))),
             "| figure | value |", "|---|---|", *source_rows[:2],
             f"| AI labels | {ph['judging']['labeled']} ({ph['judging']['errors']} pair errors) |",
             f"| preferences rows | {info['datasets']['preferences']} |",
             f"| judgments | {info['judgments']} |",
             f"| cache hits / misses | {info['cache_hits']} / {info['cache_misses']}"
             f" ({_fmt(info['cache_hits'] / looked if looked else None)} hit rate) |",
             f"| engine calls (conversations) | sampling {info['engine_calls']['sampling']}, "
             f"judging {info['engine_calls']['judging']} |", *source_rows[2:],
             f"| judging | {ph['judging']['seconds']:.1f} s ({ph['judging']['pairs_per_s']:.2f} pairs/s) |",
             f"| mean p_chosen | {_fmt(s['mean_p_chosen'])} |",
             f"| order agreement | {_fmt(s['order_agreement_rate'])} |", ""]
    lines += _paragraphs(dataset_lines(info.get("dataset_agreement")))
    if info.get("errors_by_reason") or info.get("notes_by_reason"):
        lines += ["Errors by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(info["errors_by_reason"].items())),
                  "Sample notes: " + (", ".join(f"{k} {v}" for k, v in sorted(info["notes_by_reason"].items()))
                                      or "none"), ""]
    if info.get("mix"):
        m = info["mix"]
        parts = [f"{m[f'{n}_kept']} of {m[f'{n}_in']} {n} rows (share {_fmt(m[f'actual_{n}_ratio'])}, "
                 f"asked {m[f'{n}_ratio']})" for n in m.get("sources", ["human"])]
        lines += [f"Mixed in: {'; '.join(parts)}; and {m['ai_kept']} of {m['ai_in']} AI rows "
                  f"({m['ai_overridden_by_human']} AI labels replaced by given ones).", ""]
    lines += ["![p_chosen histogram](p_chosen.png)", "", "## Per principle", "",
              "p = P(chosen is better) under that principle alone. confidence = mean 2·|p − 0.5|; sides with "
              "ensemble = share with p > 0.5; order agreement = share where both orders prefer the same response.", "",
              "| principle | pairs | confidence | sides with ensemble | order agreement |", "|---|---|---|---|---|"]
    lines += [f"| {pid} | {d['n']} | {_fmt(d['confidence'])} | {_fmt(d['sides_with_ensemble'])} | "
              f"{_fmt(d['order_agreement'])} |" for pid, d in s["per_principle"].items()]
    lines += ["", "![per principle](principles.png)", ""]
    text = "\n".join(lines)
    storage.write_text(ctx.path("report.md"), text)
    plot_hist(s, ctx.path("p_chosen.png"))
    plot_principles(s, ctx.path("principles.png"))
    return text


def write_summary(ctx, info: dict) -> str:
    """The stage's ``summary.md`` (``core.summary``'s counts) plus the gold gate and the
    agreement with the dataset's choice, on the console too."""
    text = summary.write_stage_summary(ctx, info)
    extra = gold_lines(info.get("gold")) + dataset_lines(info.get("dataset_agreement"))
    if not extra:
        return text
    console.say("\n".join(f"  {line}" for line in extra))
    text = text.rstrip("\n") + "\n" + "".join(f"- {line}\n" for line in extra)
    storage.write_text(ctx.path("summary.md"), text + "\n")
    return text
