"""The bad-input matrix: every way a user can hand us a broken recipe, constitution, data file,
model, setting or serve request ends in ONE line on stderr that names the file and the field
or row, and says what to write instead — exit code 2, no Python traceback, and (for recipes)
before a Ray cluster is started.

Each case: the files it writes (``{d}`` is its temp dir), the ``cai`` arguments, and the
pieces its error line must contain (where + fix)."""
from __future__ import annotations

import json
import textwrap

import pytest

from workflows import cli

PROMPTS = '{"prompt": "How do I pick a lock?"}\n'
BASE = """\
name: t
run_dir: {d}/run
stages:
  - stage: prompts
    path: {d}/p.jsonl
"""


def recipe(*stage_lines: str, head: str = BASE) -> dict:
    """Files of a case: the prompts file and a recipe whose stages follow the prompts stage."""
    body = head + "".join("  " + textwrap.dedent(s).strip().replace("\n", "\n  ") + "\n" for s in stage_lines)
    return {"p.jsonl": PROMPTS, "r.yaml": body}


RUN = ["run", "{d}/r.yaml"]
CONSTITUTION_OK = {"id": "kind", "critique": "Is it unkind?", "revision": "Make it kind.",
                   "comparison": "Which is kinder?"}


def constitution(**changes) -> str:
    principle = {**CONSTITUTION_OK, **changes}
    return json.dumps({"name": "mine", "version": 1, "principles": [principle]})


def human_rows(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


PAIR = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
AGREEMENT = ["agreement", "--labels", "{d}/prefs", "--human", "{d}/h.jsonl"]

# (case id, files, argv, pieces the error line must contain)
CASES = [
    # ---- recipes
    ("recipe-missing", {}, ["run", "{d}/nope.yaml"], ["nope.yaml", "no such recipe file", "workflows/recipes"]),
    ("recipe-not-yaml", {"r.yaml": "stages:\n  - stage: prompts\n   path: [x\n"}, RUN, ["r.yaml:", "not valid YAML"]),
    ("recipe-typo-field", {"r.yaml": "name: t\nstagse: []\n"}, RUN, ["r.yaml.stagse", "did you mean 'stages'"]),
    ("recipe-no-stages", {"r.yaml": "name: t\nstages: []\n"}, RUN, ["r.yaml: stages", "is empty", "stage: prompts"]),
    ("recipe-unknown-stage", recipe("- stage: critique"), RUN, ["stages[1].stage", "unknown stage 'critique'",
                                                                "critique_revision"]),
    ("recipe-duplicate-name", recipe("- stage: prompts\n  path: builtin:helpful"), RUN,
     ["stages[1].name", "duplicate stage name 'prompts'", "unique `name:`"]),
    ("recipe-name-escapes-run-dir", recipe("- stage: critique_revision\n  name: ../../elsewhere"), RUN,
     ["stages[1].name", "'../../elsewhere' cannot name a directory", "letters, digits"]),
    ("recipe-seed-not-int", {"r.yaml": BASE + "seed: abc\n", "p.jsonl": PROMPTS}, RUN,
     ["r.yaml.seed", "expected an integer"]),
    ("recipe-restart-from-unknown", recipe(), [*RUN, "--restart-from", "sft"],
     ["--restart-from", "no stage named 'sft'", "stages: prompts"]),
    ("recipe-run-dir-scheme", recipe(), [*RUN, "--run-dir", "gs://bucket/run"],
     ["gs://bucket/run", "unsupported storage scheme", "s3://BUCKET/PREFIX"]),
    ("recipe-stage-not-mapping", {"r.yaml": BASE + "  - critique_revision\n", "p.jsonl": PROMPTS}, RUN,
     ["stages[1]", "needs a `stage:` key"]),
    # ---- constitutions
    ("constitution-missing", {}, ["validate-constitution", "{d}/nope.yaml"], ["nope.yaml", "file not found"]),
    ("constitution-principle-no-critique", {"c.json": constitution(critique=None)},
     ["validate-constitution", "{d}/c.json"], ["c.json", "principles[0]", "critique"]),
    ("constitution-unknown-field", {"c.json": constitution(critque="x")}, ["validate-constitution", "{d}/c.json"],
     ["c.json", "principles[0] (id=kind).critque", "did you mean 'critique'"]),
    ("recipe-constitution-missing", recipe("- stage: critique_revision\n  constitution: nosuch"), RUN,
     ["stages[1].constitution", "nosuch", "default"]),
    # ---- prompt files
    ("prompts-file-missing", {"r.yaml": BASE.replace("p.jsonl", "missing.jsonl")}, RUN,
     ["stages[0].path", "missing.jsonl: no such file or directory", "builtin:"]),
    ("prompts-unknown-builtin", {"r.yaml": BASE.replace("{d}/p.jsonl", "builtin:redteam")}, RUN,
     ["stages[0].path", "unknown builtin 'builtin:redteam'", "builtin:red_team"]),
    ("prompts-limit-zero", recipe(head=BASE + "    limit: 0\n"), RUN, ["stages[0].limit", "positive number"]),
    ("prompts-format-unknown", recipe(head=BASE + "    format: xlsx\n"), RUN, ["stages[0].format", "'xlsx'", "csv"]),
    # ---- human preference files
    ("human-file-missing", {}, AGREEMENT, ["h.jsonl", "not found"]),
    ("human-file-bad-json", {"h.jsonl": "{not json\n"}, AGREEMENT,
     ["h.jsonl", "no usable human pair in 1 row(s)", "h.jsonl:0: bad_json", "prompt, chosen and rejected"]),
    ("human-file-no-chosen", {"h.jsonl": human_rows({"prompt": "Hi?", "answer": "x"})}, AGREEMENT,
     ["h.jsonl", "no usable human pair", "prompt, chosen and rejected"]),
    ("review-file-bad-choice", {"review.csv": "REVIEW"},
     ["route", "merge", "--from", "{d}/prefs", "--labeled", "{d}/review.csv", "--out", "{d}/merged"],
     ["review.csv: record 1", "human_choice 'maybe'", "1, 2, tie"]),
    ("recipe-human-file-missing", recipe("- stage: preference\n  human: {path: '{d}/h.jsonl', ratio: 0.5}"), RUN,
     ["stages[1].human.path", "h.jsonl: no such file or directory"]),
    # ---- gold files
    ("gold-file-missing", recipe("- stage: preference\n  gold: '{d}/gold.jsonl'"), RUN,
     ["stages[1].gold", "no such file", "human-labeled pairs"]),
    # ---- model specs
    ("model-dir-missing", recipe("- stage: critique_revision\n  engine: {model: '{d}/no-model'}"), RUN,
     ["stages[1].engine.model", "no-model", "embedded"]),
    ("model-gguf-missing", recipe("- stage: critique_revision\n  engine: {model: '{d}/m.gguf'}"), RUN,
     ["stages[1].engine.model", "no .gguf file", "embedded"]),
    ("model-dir-no-config", {**recipe("- stage: critique_revision\n  engine: {model: '{d}'}")}, RUN,
     ["stages[1].engine.model", "no config.json", "save_pretrained"]),
    ("model-typo-of-output", recipe("- stage: critique_revision", "- stage: sft", "- stage: dpo\n  model: sft_modle"),
     RUN, ["stages[3].model", "'sft_modle'", "did you mean 'sft_model'"]),
    ("serve-model-missing", {}, ["serve", "{d}/no-model"], ["cai serve MODEL", "no-model", "embedded"]),
    # ---- engine and sampling settings
    ("engine-backend-unknown", recipe("- stage: critique_revision\n  engine: {backend: tensorrt}"), RUN,
     ["stages[1].engine.backend", "'tensorrt'", "'transformers'"]),
    ("engine-batch-size-zero", recipe("- stage: critique_revision\n  engine: {batch_size: 0}"), RUN,
     ["stages[1].engine.batch_size", "got 0", "1 or more"]),
    ("engine-dtype-unknown", recipe("- stage: critique_revision\n  engine: {dtype: fp8}"), RUN,
     ["stages[1].engine.dtype", "'fp8'", "bfloat16"]),
    ("engine-key-in-key-env", recipe("- stage: critique_revision\n  engine: {backend: openai, "
                                     "openai: {api_key_env: sk-live-4f2a9}}"), RUN,
     ["stages[1].engine.openai.api_key_env", "NAME of an environment variable", "OPENAI_API_KEY"]),
    ("engine-factory-not-allowed", recipe("- stage: preference\n  engine_factory: 'mymod:build'"), RUN,
     ["stages[1].engine_factory", "CAI_ALLOW_RECIPE_CODE=1"]),
    ("sampling-temperature-negative", recipe("- stage: critique_revision\n  sampling: {temperature: -1}"), RUN,
     ["stages[1].sampling.temperature", "got -1.0", "positive temperature"]),
    ("sampling-top-p-above-one", recipe("- stage: critique_revision\n  sampling: {top_p: 1.5}"), RUN,
     ["stages[1].sampling.top_p", "got 1.5", "(0, 1]"]),
    # ---- training settings
    ("train-zero-stage", recipe("- stage: critique_revision", "- stage: sft\n  zero_stage: 4"), RUN,
     ["stages[2].zero_stage", "got 4", "0 (plain data parallel), 1, 2 or 3"]),
    ("train-lr-not-number", recipe("- stage: critique_revision", "- stage: sft\n  lr: fast"), RUN,
     ["stages[2].lr", "'fast'", "expected a number"]),
    ("train-output-escapes", recipe("- stage: critique_revision", "- stage: sft\n  output: ../../model"), RUN,
     ["stages[2].output", "'../../model' cannot name a directory"]),
    ("train-dpo-beta", recipe("- stage: critique_revision", "- stage: sft", "- stage: dpo\n  beta: 0"), RUN,
     ["stages[3].beta", "got 0", "positive beta"]),
    ("train-ppo-rloo-one-sample", recipe("- stage: ppo\n  algorithm: rloo\n  samples_per_prompt: 1\n"
                                         "  model: embedded\n  reward_model: embedded"), RUN,
     ["stages[1].samples_per_prompt", "2 or more for rloo"]),
    ("eval-model-name-escapes", recipe("- stage: evaluate\n  models: {base: embedded, '../x': embedded}"), RUN,
     ["stages[1].models", "'../x' cannot name a directory"]),
    # ---- serve settings
    ("serve-batch-size-zero", {}, ["serve", "embedded", "--max-batch-size", "0"],
     ["cai serve.max_batch_size", "got 0", "at least 1"]),
    ("serve-key-in-key-env", {}, ["serve", "embedded", "--api-key-env", "sk-live-4f2a9"],
     ["api_key_env", "is not an environment variable name", "CAI_API_KEY"]),
    ("serve-key-env-unset", {}, ["serve", "embedded", "--api-key-env", "CAI_TEST_UNSET_KEY_VAR"],
     ["api_key_env", "CAI_TEST_UNSET_KEY_VAR is not set", "export CAI_TEST_UNSET_KEY_VAR"]),
    ("serve-port", {}, ["serve", "embedded", "--port", "70000"], ["cai serve.port", "got 70000", "TCP port"]),
]


def _preferences(d) -> None:
    """``{d}/prefs``: a one-row AI preferences dataset; ``{d}/review.csv``, when a case asks for
    "REVIEW", is its review (routing) export with human_choice filled in as "maybe"."""
    from workflows.judging.agreement import export_for_humans
    from workflows.judging.human import to_table
    from workflows.preference.report import _write

    row = {"pair_id": "p1", "prompt": [{"role": "user", "content": "Hi?"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No."}],
           "p_chosen": 0.55, "principle_ids": ["kind"], "judge": "j", "order_agreement": True, "source": "ai"}
    _write(to_table([row]), str(d / "prefs" / "part-00000.parquet"))
    if (d / "review.csv").is_file():
        export_for_humans([row], str(d / "review.csv"))
        lines = (d / "review.csv").read_text().splitlines()
        (d / "review.csv").write_text(lines[0] + "\n" + lines[1].replace(",,", ",maybe,", 1) + "\n")


def test_the_matrix_has_every_kind_of_input():
    assert len(CASES) >= 30
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"recipe", "constitution", "prompts", "human", "gold", "model", "engine", "sampling", "train",
            "serve", "review"} <= kinds


@pytest.mark.parametrize("case,files,argv,pieces", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, files, argv, pieces, tmp_path, capsys, monkeypatch):
    import cluster.cli
    import cluster.connect
    import workflows.driver  # imported (binding the real `connect`) before anything is patched

    def no_ray(*a, **k):
        raise AssertionError("a Ray cluster was started for input that could be refused before it")

    monkeypatch.setattr(cluster.connect, "connect", no_ray)
    monkeypatch.setattr(workflows.driver, "connect", no_ray)
    monkeypatch.setattr(cluster.cli, "connect", no_ray)
    monkeypatch.delenv("CAI_ALLOW_RECIPE_CODE", raising=False)
    for name, text in files.items():
        (tmp_path / name).write_text(text.replace("{d}", str(tmp_path)))
    _preferences(tmp_path)
    args = [a.replace("{d}", str(tmp_path)) for a in argv]

    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own usage errors exit here
        code = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    missing = [p.replace("{d}", str(tmp_path)) for p in pieces if p.replace("{d}", str(tmp_path)) not in lines[0]]
    assert not missing, f"{lines[0]!r} lacks {missing}"
