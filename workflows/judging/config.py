"""The settings pairs are judged with: the ``preference`` stage's config, which the judging
machinery (``judging.batch.judge_pairs``, the actor pool of ``judging.workers``, the gold gate
of ``judging.gold``) is parameterized by. The ``evaluate`` stage builds one too, to have its
judge label gold pairs exactly as the preference stage would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from actors import EngineConfig, SamplingParams
from workflows.core import storage
from workflows.core.errors import ConfigError
from workflows.core.safety import check_recipe_code
from workflows.core.typed import check_fields
from workflows.core.pairwise import COT_BAND

# Data shipped with the evaluate stage (held-out prompt sets, ``gold_pairs``): a documented
# location, read by path here so the gold gate needs no import of that stage.
SHIPPED = Path(__file__).resolve().parent.parent / "evaluate" / "data"


@dataclass
class HumanData:
    """Human preference data (``workflows.judging.human.load_human`` formats) mixed into ``preferences``."""

    path: str = ""
    ratio: float = 0.5  # fraction of the output that is human: 0 → AI rows only, 1 → human rows only
    split: str = "train"  # for saved Hugging Face dataset dirs
    limit: int | None = None


@dataclass
class RevisionData:
    """Revision pairs (``workflows.preference.revisions``) mixed into ``preferences``: chosen = the
    SL-CAI revision, rejected = the initial answer."""

    input: str = "revision_pairs"  # a revision_pairs or sl_cai dataset name of an earlier stage, or a parquet dir
    ratio: float = 0.5  # fraction of the output that is revision pairs
    p_chosen: float = 1.0  # label confidence when made here from an sl_cai dataset


@dataclass
class PreferenceConfig:
    """RL-CAI labeling: who samples, how pairs are chosen, who judges under which principles."""

    input: str = "prompts"  # dataset name of an earlier stage, or a parquet directory of prompts
    # existing pairs to label instead of sampling (then no policy runs and `input` is unused):
    # prompt/chosen/rejected, HH chosen/rejected transcripts, or prompt + response_a/response_b
    # (or response_1/response_2); jsonl/json/csv/parquet or a saved HF dataset dir
    pairs_from: str | None = None
    constitution: str = "default"
    policy: EngineConfig = field(default_factory=EngineConfig)
    samples_per_prompt: int = 2  # K
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        max_new_tokens=128, temperature=1.0, top_p=0.95, seed=0))
    max_prompt_chars: int = 8000
    pairs: Literal["all", "sample"] = "all"  # every pair of distinct samples, or pairs_per_prompt of them
    pairs_per_prompt: int | None = None
    judges: list[EngineConfig] = field(default_factory=lambda: [EngineConfig()])  # an ensemble averages judges
    principles_per_pair: int = 1  # m: the ensemble over principles
    both_orders: bool = True
    cot: bool = False
    cot_max_new_tokens: int = 128
    clamp: list[float] | None = None  # [lo, hi]; null → [0.4, 0.6] with cot, none without ([0, 1] = off)
    cache: bool = True
    cache_uri: str | None = None  # default: <run_dir>/label_cache
    human: HumanData | None = None
    revisions: RevisionData | None = None
    # the gold gate: human-labeled pairs (prompt/chosen/rejected formats of `human`) the judges
    # label first, with these same settings; below min_agreement the stage stops or warns
    gold: str | None = None  # a file, or builtin:gold_pairs (90 pairs shipped with the evaluate stage)
    min_agreement: float = 0.6  # share of gold pairs where the AI picks the human's answer
    max_position_bias: float | None = 0.4  # share of gold pairs whose two orders disagree (null: no limit)
    on_gold_fail: Literal["stop", "warn"] = "stop"
    checkpoint_rows: int = 256  # rows per raw file: the unit of work a resumed run does not redo
    engine_factory: str | None = None  # "module:callable" building every engine (tests, benchmarks)

    @property
    def band(self) -> tuple[float, float] | None:
        if self.clamp is not None:
            return (float(self.clamp[0]), float(self.clamp[1]))
        return COT_BAND if self.cot else None

    def validate(self, where: str) -> None:
        c, h = self.clamp, self.human
        checks = [
            ("samples_per_prompt", self.samples_per_prompt < 2, "use 2 or more: a pair needs two responses"),
            ("sampling.temperature", self.sampling.temperature <= 0,
             "sample with temperature > 0 (e.g. 1.0): greedy decoding gives K identical responses"),
            ("sampling.max_new_tokens", self.sampling.max_new_tokens < 1, "use 1 or more"),
            ("pairs_per_prompt", self.pairs == "sample" and (self.pairs_per_prompt or 0) < 1,
             "with pairs: sample, set pairs_per_prompt to 1 or more"),
            ("judges", not self.judges, "list at least one judge engine, e.g. judges: [{model: embedded}]"),
            ("principles_per_pair", self.principles_per_pair < 1, "use 1 or more"),
            ("cot_max_new_tokens", self.cot_max_new_tokens < 1, "use 1 or more"),
            ("clamp", c is not None and not (len(c) == 2 and 0.0 <= c[0] <= c[1] <= 1.0),
             "write [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0.4, 0.6], or null"),
            ("cache_uri", self.cache_uri is not None and not self.cache_uri.strip(), "remove it or give a path"),
            ("human.path", h is not None and not h.path.strip(), "point it at a jsonl/csv/parquet/HF dataset dir"),
            ("human.ratio", h is not None and not 0.0 <= h.ratio <= 1.0, "use a fraction between 0 and 1"),
            ("revisions.ratio", self.revisions is not None and not 0.0 <= self.revisions.ratio <= 1.0,
             "use a fraction between 0 and 1"),
            ("revisions.ratio", self.revisions is not None and h is not None and h.ratio + self.revisions.ratio > 1.0,
             "human.ratio + revisions.ratio is the given share of the output: make them add up to at most 1"),
            ("revisions.p_chosen", self.revisions is not None and not 0.5 < self.revisions.p_chosen <= 1.0,
             "use a confidence above 0.5 and at most 1.0"),
            ("pairs_from", _missing_file(self.pairs_from),
             "no such file: point it at a jsonl/json/csv/parquet file or saved Hugging Face dataset dir of pairs"),
            ("gold", _missing_file(self.gold),
             "no such file: point it at a jsonl/json/csv/parquet file or saved Hugging Face dataset dir of "
             "human-labeled pairs (prompt, chosen, rejected)"),
            ("min_agreement", not 0.0 <= self.min_agreement <= 1.0, "use a share between 0 and 1, e.g. 0.6"),
            ("max_position_bias", self.max_position_bias is not None and not 0.0 <= self.max_position_bias <= 1.0,
             "use a share between 0 and 1, e.g. 0.4, or null"),
            ("checkpoint_rows", self.checkpoint_rows < 1, "use 1 or more"),
        ]
        check_fields(self, where, checks)
        check_recipe_code(self.engine_factory, where)


def _missing_file(path: str | None) -> bool:
    """True for an empty path or a local one that does not exist. Remote (s3://) paths are
    checked when the stage reads them (validation needs no network)."""
    if path is None:
        return False
    if path.startswith("builtin:"):
        return not (SHIPPED / f"{path.split(':', 1)[1]}.jsonl").is_file()
    return not path.strip() or (not storage.is_remote(path) and not os.path.exists(path))


def judge_id(cfg: EngineConfig) -> str:
    """A judge's identity in cache keys: backend and model (plus tokenizer / endpoint when set).
    Weights overwritten in place keep the id: use another cache_uri then."""
    parts = [cfg.backend, cfg.model] + ([f"tokenizer={cfg.tokenizer}"] if cfg.tokenizer else [])
    return ":".join(parts + ([cfg.openai.base_url] if cfg.backend == "openai" else []))


def gold_location(spec: str) -> str:
    """``builtin:gold_pairs`` (the 90 human-labeled pairs shipped with the evaluate stage) or a path as given."""
    if spec.startswith("builtin:"):
        path = SHIPPED / f"{spec.split(':', 1)[1]}.jsonl"
        if not path.is_file():
            raise ConfigError("gold", f"no shipped gold set {spec!r}", "use builtin:gold_pairs or a file path")
        return str(path)
    return spec
