"""The driver: runs a recipe's stages in order, handing each the datasets of the ones before.

A recipe is YAML (see ``workflows/recipes/``)::

    name: demo
    run_dir: runs/demo
    stages:
      - stage: prompts
        path: builtin:red_team
      - stage: critique_revision
        rounds: 1

Adding a stage = one entry in ``STAGES`` (its config dataclass, its ``run(cfg, ctx)``,
the datasets it makes). A finished stage (``_SUCCESS`` with the same config hash) is
skipped; an interrupted one resumes from its raw rows.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from actors.base import EngineError
from actors.sources import EMBEDDED_ALIASES, resolve_model
from cluster.connect import RayConfig, connect
from workflows.core.constitution import load_constitution
from workflows.core import stage as stage_mod
from workflows.core import console, storage, summary
from workflows.core.errors import ConfigError
from workflows.core.overrides import apply_overrides
from workflows.core.safety import check_name
from workflows.core.spill import Budget
from workflows.core.stage import StageContext
from workflows.core.tracking import TrackingConfig, open_tracker
from workflows.core.typed import from_dict, to_dict
from workflows.evaluate import guard


@dataclass(frozen=True)
class StageSpec:
    config: str  # "module:Class" of the stage's config dataclass
    run: str  # "module:function" taking (cfg, ctx) and returning the _SUCCESS info
    outputs: tuple[str, ...]
    help: str
    always_runs: bool = False  # never skipped as finished (serving)
    before: str | None = None  # "module:function" (cfg, ctx) run before the stage starts or resumes

    def load(self, ref: str):
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)


_JUDGE_GATE = "workflows.judging.rl_gate:check"  # the gold gate of `reward: judge` / `labeler: judge`
STAGES: dict[str, StageSpec] = {
    "prompts": StageSpec("workflows.prompt_sources:PromptsConfig", "workflows.prompts.stage:run", ("prompts",),
                         "read prompts (jsonl/csv/parquet/HF dataset/builtin) into the prompts dataset"),
    "critique_revision": StageSpec(
        "workflows.sl_cai.stage:CritiqueRevisionConfig", "workflows.sl_cai.stage:run", ("sl_cai", "sft"),
        "SL-CAI: answer, then N rounds of critique and revision under sampled principles"),
    "preference": StageSpec(
        "workflows.judging.config:PreferenceConfig", "workflows.preference.stage:run", ("pairs", "preferences"),
        "RL-CAI: K samples per prompt, pairs judged (A)/(B) under sampled principles in both orders, soft labels"),
    "revision_pairs": StageSpec(
        "workflows.preference.revisions:RevisionPairsConfig", "workflows.preference.revisions:run",
        ("revision_pairs",), "preference pairs from SL-CAI: the revision chosen over the initial answer, no judge"),
    "sft": StageSpec("training.config:SFTConfig", "training.sft:run", ("sft_model",),
                     "supervised fine-tuning on the sft dataset (Ray Train + DeepSpeed)"),
    "reward": StageSpec("training.config:RewardConfig", "training.reward:run", ("reward_model",),
                        "reward model: backbone + scalar head, Bradley–Terry with soft labels, on preferences"),
    "dpo": StageSpec("training.config:DPOConfig", "training.dpo:run", ("dpo_model",),
                     "DPO / cDPO / IPO against the frozen starting model, on preferences"),
    "ppo": StageSpec("training.config:PPOConfig", "training.ppo:run", ("ppo_model",),
                     "RL-CAI: PPO or RLOO of the policy against the reward model, rollouts from engine actors",
                    before=_JUDGE_GATE),
    "online_dpo": StageSpec("training.config:OnlineDPOConfig", "training.online_dpo:run", ("online_dpo_model",),
                            "online DPO: rounds of the policy's own answers, labeled (rules or reward model) "
                            "into pairs, DPO on them", before=_JUDGE_GATE),
    "grpo": StageSpec("training.config:GRPOConfig", "training.ppo:run_grpo", ("grpo_model",),
                      "RL-CAI: GRPO (group-relative advantages, no critic; Dr. GRPO as an option), ppo's rollouts",
                      before=_JUDGE_GATE),
    "evaluate": StageSpec("workflows.evaluate.config:EvaluateConfig", "workflows.evaluate.stage:run", ("eval_prompts",),
                          "answer held-out prompts with every model, score them, report a verdict against the base"),
    "serve": StageSpec("cluster.serve.stage:ServeStageConfig", "cluster.serve.stage:run", (),
                       "serve a model of the run (e.g. sft_model) behind an OpenAI-compatible API (Ray Serve)",
                       always_runs=True),
}
# Fields that size the pool but do not change results: changing them still resumes a run.
_RESOURCE_FIELDS = ("batch_size", "concurrency", "num_cpus", "num_gpus", "torch_threads")
_TRANSPORT_FIELDS = ("allow_insecure_http",)
# Training settings that change how a job runs, not what it learns.
_RUNTIME_FIELDS = ("cpus_per_worker", "max_failures", "keep_checkpoints", "checkpoint_every", "fail_at_step",
                   "collective_timeout_s", "checkpoint_rows")


@dataclass
class Recipe:
    name: str = "run"
    run_dir: str = "runs/run"  # a local path or s3://bucket/prefix
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    bookkeeping: Budget = field(default_factory=Budget)  # driver memory for each stage's id bookkeeping
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow, W&B or TensorBoard (docs/recipes.md)
    stages: list[dict] = field(default_factory=list)
    # the command line's --set items, already applied above: a run's recipe.yaml says what changed
    overrides: list[str] = field(default_factory=list)


@dataclass
class PlannedStage:
    name: str
    kind: str
    config: object

    @property
    def outputs(self) -> tuple[str, ...]:
        """The datasets (or model) this stage makes, by the names later stages use."""
        return (self.config.output,) if hasattr(self.config, "output") else STAGES[self.kind].outputs


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe at ``path``, with ``--set`` ``overrides`` applied before it is validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such recipe file", "see workflows/recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if overrides:
        data = apply_overrides(data, overrides, [f.name for f in dataclasses.fields(Recipe)])
        data["overrides"] = [*(data.get("overrides") or []), *overrides]
    return from_dict(Recipe, data, str(path))


def resolved(recipe: Recipe, where: str = "recipe") -> dict:
    """The recipe with every stage's settings spelt out, defaults and nested settings included
    (``cai config``): loading it again gives the same recipe."""
    out = {f.name: to_dict(getattr(recipe, f.name)) for f in dataclasses.fields(Recipe) if f.name != "stages"}
    out["stages"] = [{"stage": s.kind, "name": s.name, **to_dict(s.config)} for s in plan(recipe, where)]
    return out


def plan(recipe: Recipe, where: str = "recipe") -> list[PlannedStage]:
    """Validate every stage entry into its typed config; names must be unique."""
    if not recipe.stages:
        raise ConfigError(f"{where}: stages", "is empty", "list at least one stage, e.g. `- stage: prompts`")
    planned, names = [], set()
    for i, entry in enumerate(recipe.stages):
        at = f"{where}: stages[{i}]"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(at, "needs a `stage:` key", f"one of: {', '.join(STAGES)}")
        body = dict(entry)
        kind, name = body.pop("stage"), body.pop("name", None) or entry["stage"]
        if kind not in STAGES:
            raise ConfigError(f"{at}.stage", f"unknown stage {kind!r}", f"one of: {', '.join(STAGES)}")
        check_name(name, f"{at}.name", "stage name")
        if name in names:
            raise ConfigError(f"{at}.name", f"duplicate stage name {name!r}", "give each stage a unique `name:`")
        names.add(name)
        spec = STAGES[kind]
        planned.append(PlannedStage(name, kind, from_dict(spec.load(spec.config), body, at)))
    return planned


def _model_refs(data, path: str = ""):
    """(dotted field, spec) of every model a stage config names: engines' ``model`` (not an
    OpenAI endpoint's, which names a remote model), ``model``/``reward_model`` and ``models.*``."""
    if isinstance(data, dict):
        if "backend" in data and "model" in data:
            if data["backend"] != "openai":
                yield f"{path}.model", data["model"]
            return
        for k, v in data.items():
            if k in ("model", "reward_model") and isinstance(v, str):
                yield f"{path}.{k}", v
            elif k == "models" and isinstance(v, dict):
                yield from ((f"{path}.models.{n}", m) for n, m in v.items() if isinstance(m, str))
            else:
                yield from _model_refs(v, f"{path}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _model_refs(v, f"{path}[{i}]")


def check_model_ref(spec: str, at: str, produced: set[str] = frozenset()) -> None:
    """A model a stage names, checked before Ray starts: an earlier stage's output, ``embedded``, or a
    local path that holds a model. Hub ids (``org/name``) are left to the stage (no network here)."""
    if spec in produced or spec.lower() in {a.lower() for a in EMBEDDED_ALIASES}:
        return
    p = Path(spec).expanduser()
    close = difflib.get_close_matches(spec, sorted(produced), n=1)
    if close and not p.exists():
        raise ConfigError(at, f"{spec!r} is neither an earlier stage's output nor a path", f"did you mean {close[0]!r}?")
    if p.exists() or spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        try:
            resolve_model(spec)
        except EngineError as e:
            raise ConfigError(at, str(e)) from None


def _input_files(s: PlannedStage) -> list[tuple[str, str]]:
    """(field, path) of the local files a stage reads that no earlier stage makes."""
    files = []
    if s.kind == "prompts" and ":" not in s.config.path:
        files.append(("path", s.config.path))
    if s.kind == "preference" and s.config.human is not None and not storage.is_remote(s.config.human.path):
        files.append(("human.path", s.config.human.path))
    return files


def preflight(recipe: Recipe, stages: list[PlannedStage], where: str) -> None:
    """What can be checked before Ray starts, so a typo costs a second, not a cluster start: the
    run directory's storage scheme, the files stages read, every model a stage names, and its
    constitution. Relative paths are relative to where `cai run` runs (a job's: its working_dir),
    so `cai submit` does not check files here."""
    storage.resolve(recipe.run_dir)
    produced: set[str] = set()
    for i, s in enumerate(stages):
        for field_path, path in _input_files(s):
            if not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(f"{where}: stages[{i}].{field_path}", f"{path}: no such file or directory",
                                  "check the path (relative paths start where you run cai); prompts may also be "
                                  "hf:NAME or builtin:red_team|helpful|benign_edgy|all")
        for field_path, spec in _model_refs(to_dict(s.config)):
            check_model_ref(spec, f"{where}: stages[{i}]{field_path}", produced)
        if isinstance(getattr(s.config, "constitution", None), str):
            try:
                load_constitution(s.config.constitution)
            except ConfigError as e:
                raise ConfigError(f"{where}: stages[{i}].constitution", str(e)) from None
        produced.update(s.outputs)


def _without_resources(data):
    """Drop pool-sizing fields of every engine config, wherever it sits (engine, policy, judges[i])."""
    if isinstance(data, dict):
        is_engine = "backend" in data and "model" in data
        if is_engine and isinstance(data.get("openai"), dict):  # a transport setting, not a result's
            data = {**data, "openai": {k: v for k, v in data["openai"].items() if k not in _TRANSPORT_FIELDS}}
        return {k: _without_resources(v) for k, v in data.items() if not (is_engine and k in _RESOURCE_FIELDS)}
    if isinstance(data, list):
        return [_without_resources(v) for v in data]
    return data


def result_hash(cfg, seed: int) -> str:
    data = {k: v for k, v in _without_resources(to_dict(cfg)).items() if k not in _RUNTIME_FIELDS}
    return stage_mod.config_hash({**data, "_seed": seed})


def _recorded_hash(uri: str, cfg, seed: int) -> str | None:
    """The hash of the settings a stage recorded (``_config.json``) read with today's defaults: a
    field added after the run directory was made (``label_field``, ``judge``, a nested engine
    setting) is there at its default, so an older version's run still resumes after an upgrade —
    unless the recipe now sets that field to something else. None when they no longer read."""
    doc = storage.read_json(uri)
    try:
        return result_hash(from_dict(type(cfg), doc.get("config") if isinstance(doc, dict) else None), seed)
    except Exception:  # renamed or removed fields: the settings differ
        return None


def _started_hash(uri: str, name: str) -> str:
    """The config hash a half-finished stage was started with (``_config.json``)."""
    fix = f"rerun with `--restart-from {name}` to redo the stage (and what follows), or use another run_dir"
    doc = storage.read_json(uri, fix)
    if not isinstance(doc, dict) or not isinstance(doc.get("config_hash"), str):
        raise ConfigError(uri, "not a stage's config record (no config_hash)", fix)
    return doc["config_hash"]


def _check_resumable(ctx: StageContext, h: str, info: dict | None, cfg, seed: int) -> bool:
    """True if the stage is already finished with this config. A finished or half-finished
    stage made with another config is an error: mixing results would be silent corruption."""
    started_uri = ctx.path("_config.json")
    old = info["config_hash"] if info else (_started_hash(started_uri, ctx.name)
                                            if storage.exists(started_uri) else None)
    if old is not None and old != h and storage.exists(started_uri):
        old = _recorded_hash(started_uri, cfg, seed) or old
    if old is not None and old != h:
        raise ConfigError(f"stage {ctx.name}", f"{ctx.dir} was made with a different config",
                          f"re-run with `--restart-from {ctx.name}` to redo it (and what follows), "
                          "or use another run_dir")
    return info is not None


def _overlap_guards(stages: list[PlannedStage]) -> list[tuple[PlannedStage, object]]:
    """(evaluate stage, its eval-prompt index built on first use) for each evaluate stage that
    does not allow overlap with the recipe's training data."""
    return [(s, functools.cache(functools.partial(guard.eval_index, s.config))) for s in stages
            if s.kind == "evaluate" and not s.config.allow_overlap]


def run_recipe(recipe: Recipe, restart_from: str | None = None, where: str = "recipe") -> dict[str, dict]:
    stages = plan(recipe, where)
    names = [s.name for s in stages]
    if restart_from is not None and restart_from not in names:
        raise ConfigError("--restart-from", f"no stage named {restart_from!r}", f"stages: {', '.join(names)}")
    preflight(recipe, stages, where)
    storage.makedirs(recipe.run_dir)
    connect(recipe.ray, recipe.run_dir)
    storage.write_text(storage.join(recipe.run_dir, "recipe.yaml"), yaml.safe_dump(to_dict(recipe), sort_keys=False))
    if restart_from is not None:
        for s in stages[names.index(restart_from):]:
            storage.delete(storage.join(recipe.run_dir, s.name))
    datasets: dict[str, str] = {}
    infos: dict[str, dict] = {}
    started = time.time()
    guards = _overlap_guards(stages)
    tracker = open_tracker(recipe.tracking, recipe.name, recipe.run_dir,
                           {"seed": recipe.seed, "run_dir": recipe.run_dir, "recipe": where,
                            "overrides": recipe.overrides, "stages": names})
    try:
        _run_stages(recipe, stages, guards, datasets, infos, tracker)
    except BaseException as e:
        tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close()
    summary.run_summary(recipe.run_dir, recipe.name, infos)
    console.say(f"\nrun {recipe.name} finished in {time.time() - started:.0f} s; "
          f"summary: {storage.join(recipe.run_dir, 'summary.md')}")
    return infos


def _run_stages(recipe: Recipe, stages: list[PlannedStage], guards, datasets: dict, infos: dict, tracker) -> None:
    """Each stage in order: skipped when finished with the same settings, else run; then tracked."""
    for i, s in enumerate(stages):
        h = result_hash(s.config, recipe.seed)
        ctx = StageContext(recipe.run_dir, s.name, recipe.seed, inputs=dict(datasets), config_hash=h,
                           budget=recipe.bookkeeping)
        spec = STAGES[s.kind]
        info = None if spec.always_runs else stage_mod.read_success(ctx.dir)
        if not spec.always_runs and _check_resumable(ctx, h, info, s.config, recipe.seed):
            left_out = f", {info['skipped']} left out on purpose" if info.get("skipped") else ""
            console.say(f"[{s.name}] already finished ({info['outputs']} rows{left_out}, {info['errors']} errors) — skipped")
        else:
            storage.write_json(ctx.path("_config.json"), {"config_hash": h, "config": to_dict(s.config)})
            if spec.before:
                spec.load(spec.before)(s.config, ctx)
            info = spec.load(spec.run)(s.config, ctx)
        infos[s.name] = info
        tracker.stage(s.name, s.kind, to_dict(s.config), info, ctx.dir)
        outputs = s.outputs
        datasets.update({d: ctx.path(d) for d in outputs})
        for later, index in guards:
            if stages.index(later) > i and s.kind != "evaluate":
                guard.check_stage_outputs(index(), later.name, s.name, {d: ctx.path(d) for d in outputs})
