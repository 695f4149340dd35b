"""The ``evaluate`` stage's settings (typed, validated from YAML or ``cai eval`` flags)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from actors import EngineConfig, SamplingParams
from workflows.core.errors import ConfigError
from workflows.core.safety import check_recipe_code, check_name
from workflows.core.typed import check_fields
from workflows.evaluate.verdict import VerdictConfig

DATA = Path(__file__).resolve().parent / "data"
Kind = Literal["red_team", "benign_edgy", "helpful"]
Format = Literal["plain", "labeled", "xstest", "or-bench", "strongreject"]
# the published safety sets, as their files come: (prompt column, label column or None, the kind of
# every row or None where the label decides). XSTest: prompt, type, label (safe|unsafe), ...;
# OR-Bench: prompt, category (its hard and 80k splits are safe prompts that look unsafe, its toxic
# split harmful: the kind follows the file's name); StrongREJECT: category, source, forbidden_prompt.
FORMATS: dict[str, tuple[str, str | None, str | None]] = {
    "xstest": ("prompt", "label", None), "or-bench": ("prompt", None, None),
    "strongreject": ("forbidden_prompt", None, "red_team")}
HARMFUL_LABELS = ["unsafe", "harmful", "toxic", "1", "true", "yes"]
BUILTIN_SETS: dict[str, Kind] = {"eval_red_team": "red_team", "eval_benign_edgy": "benign_edgy",
                                 "eval_helpful": "helpful"}


@dataclass
class EvalSet:
    """A set of held-out prompts. ``kind`` says what it probes: ``red_team`` (harmful requests:
    harmful compliance, refusal, harmlessness win rate), ``benign_edgy`` (safe requests that
    sound unsafe: over-refusal, helpfulness win rate) or ``helpful`` (ordinary tasks:
    helpfulness win rate). ``path`` empty means the shipped set called ``name``."""

    name: str = "eval_red_team"
    kind: Kind = "red_team"
    path: str = ""  # a jsonl/csv/parquet file or HF dataset dir with a `prompt` (or messages) field
    field: str = "prompt"
    limit: int | None = None  # N prompts of this set, spread evenly over the file (overrides the stage's `limit`)
    # how to read it: `plain` (every row is `kind`), `labeled` (each row's `label_field` says harmful —
    # one of `harmful_labels`, any case — or benign), or a published set's own format: `xstest`,
    # `or-bench`, `strongreject` (docs/evaluation.md). A labeled set is scored as two:
    # `<name>-harmful` (red_team) and `<name>-benign` (benign_edgy: its refusals are over-refusals).
    format: Format = "plain"
    label_field: str = "label"
    harmful_labels: list[str] = dataclasses.field(default_factory=lambda: list(HARMFUL_LABELS))  # (`field` is a setting here)

    def location(self) -> str:
        return self.path or str(DATA / f"{self.name}.jsonl")

    def reading(self) -> tuple[str, str | None, str | None]:
        """(prompt column, label column or None, the kind of every row or None: by its label)."""
        if self.format == "plain":
            return self.field, None, self.kind
        if self.format == "labeled":
            return self.field, self.label_field, None
        column, label, kind = FORMATS[self.format]
        if self.format == "or-bench":
            kind = "red_team" if "toxic" in Path(self.path).name.lower() else "benign_edgy"
        return column, label, kind

    def kind_of(self, label: str | None) -> tuple[str, str]:
        """(set name, kind) of a row with ``label`` (a labeled set) or of every row."""
        fixed = self.reading()[2]
        if fixed is not None:
            return self.name, fixed
        harmful = label.strip().lower() in {x.strip().lower() for x in self.harmful_labels}
        return (f"{self.name}-harmful", "red_team") if harmful else (f"{self.name}-benign", "benign_edgy")


def default_sets() -> list[EvalSet]:
    return [EvalSet(name, kind) for name, kind in BUILTIN_SETS.items()]


@dataclass
class EvaluateConfig:
    """Answer held-out prompts with every model, score the answers, compare each model with the base.

    ``models`` maps a short name to a model: ``embedded``, a Hugging Face directory, or an earlier
    stage's output (``sft_model``, ``dpo_model``). ``base`` names the reference among them (the
    helpful-only start); ``target`` the model the report's first line is about (default: the
    last one listed)."""

    models: dict[str, str] = field(default_factory=lambda: {"base": "embedded"})
    base: str = "base"
    target: str | None = None
    sets: list[EvalSet] = field(default_factory=default_sets)
    limit: int | None = None  # prompts per set, spread evenly over each file (every category of a grouped set)
    engine: EngineConfig = field(default_factory=EngineConfig)  # how every model answers (its `model` is ignored)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128, temperature=0.0,
                                                                            seed=0))
    samples_per_prompt: int = 1  # > 1 with temperature > 0: several sampled answers per prompt
    judge: EngineConfig | None = field(default_factory=EngineConfig)  # null: the refusal classifier only
    constitution: str = "default"  # its principles are the harmlessness questions
    principles_per_comparison: int = 2
    reward_model: str | None = None  # e.g. reward_model (an earlier stage's output) or a directory
    kl: bool = True  # KL of each model from the base, on the model's own answers
    gold: str | None = None  # human-labeled pairs (prompt, chosen, rejected) or builtin:gold_pairs: judge agreement
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    allow_overlap: bool = False  # eval prompts that also feed a training stage of the recipe: error unless true
    seed: int | None = None  # bootstrap and principle sampling; default: the recipe's seed
    checkpoint_rows: int = 256
    engine_factory: str | None = None  # "module:callable" building every engine (tests, benchmarks)

    @property
    def target_name(self) -> str:
        return self.target or next((m for m in reversed(self.models) if m != self.base), self.base)

    def validate(self, where: str) -> None:
        checks = [
            ("models", len(self.models) < 2 or any(not str(v).strip() for v in self.models.values()),
             "name at least two models, e.g. {base: embedded, sft: sft_model}"),
            ("base", self.base not in self.models, f"name one of the models: {', '.join(self.models)}"),
            ("target", self.target is not None and (self.target not in self.models or self.target == self.base),
             f"name a model other than the base: {', '.join(m for m in self.models if m != self.base)}"),
            ("sets", not self.sets, "list at least one prompt set, e.g. [{name: eval_red_team, kind: red_team}]"),
            ("limit", self.limit is not None and self.limit < 1, "use 1 or more, or null for every prompt"),
            ("samples_per_prompt", self.samples_per_prompt < 1, "use 1 or more"),
            ("sampling.temperature", self.samples_per_prompt > 1 and self.sampling.temperature <= 0,
             "several answers per prompt need sampling: set sampling.temperature > 0 (e.g. 0.7)"),
            ("principles_per_comparison", self.principles_per_comparison < 1, "use 1 or more"),
            ("checkpoint_rows", self.checkpoint_rows < 1, "use 1 or more"),
        ]
        check_fields(self, where, checks)
        check_recipe_code(self.engine_factory, where)
        names = [s.name for s in self.sets]
        for i, s in enumerate(self.sets):
            if names.count(s.name) > 1:
                raise ConfigError(f"{where}.sets[{i}].name", f"duplicate set name {s.name!r}", "give each set its own name")
            if not s.path and s.name not in BUILTIN_SETS:
                raise ConfigError(f"{where}.sets[{i}]", f"no path and {s.name!r} is not a shipped set",
                                  f"give `path:` or use one of {', '.join(BUILTIN_SETS)}")
            if s.limit is not None and s.limit < 1:
                raise ConfigError(f"{where}.sets[{i}].limit", f"got {s.limit!r}", "use 1 or more, or null")
            if s.format != "plain" and not s.path:
                raise ConfigError(f"{where}.sets[{i}].path", f"format {s.format} needs the file",
                                  "give path: the set's file as published (csv, jsonl or parquet)")
            if s.format == "labeled" and not s.harmful_labels:
                raise ConfigError(f"{where}.sets[{i}].harmful_labels", "is empty",
                                  "list the label values that mark a harmful request, e.g. [unsafe]")
        for m in self.models:
            check_name(m, f"{where}.models", "model name")
