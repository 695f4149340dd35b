"""Loading a model with transformers (docs/engines.md); what a model spec names (``embedded``, a
``.gguf`` file, a ``save_pretrained`` directory, a hub id) is resolved by ``actors.sources``.

A GGUF model is dequantized by transformers on every load, which takes ~20 s for the embedded
model (and ~3 s more for its tokenizer). The first load therefore also writes the dequantized
model and its tokenizer as a plain Hugging Face directory under ``$CAI_RAY_CACHE`` (default
``~/.cache/cai-ray``; ``CAI_RAY_CACHE=off`` disables it), keyed by the file's path, size and
modification time and the transformers version; later loads (every actor of every stage) read
that directory in well under a second. The weights are the same tensors either way.
Apart from that nothing is cached: every call loads afresh, so each actor owns its model.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from actors.base import EngineError
from actors.sources import (  # noqa: F401 — where a model is: re-exported for the loaders' callers
    EMBEDDED, EMBEDDED_ALIASES, EMBEDDED_GGUF, EMBEDDED_PACKAGE, ModelSource, resolve_model)
from actors.precision import DtypeChoice, DtypeError, choose_dtype

def _source(spec_or_source: str | ModelSource) -> ModelSource:
    return spec_or_source if isinstance(spec_or_source, ModelSource) else resolve_model(spec_or_source)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as torch spells it."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EngineError(f"engine.device: {device!r} is not a device — use auto, cpu, cuda or cuda:N") from e


def choose(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
           setting: str = "engine.dtype") -> DtypeChoice:
    """The number format for ``device`` (see :mod:`actors.precision`), with its reason."""
    try:
        return choose_dtype(dtype, resolve_device(device), setting=setting)
    except DtypeError as e:
        raise EngineError(str(e)) from e


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``choose(dtype, device).dtype``: ``auto`` → bfloat16 on CUDA; on a CPU bfloat16 only where
    the processor computes it natively, else float32."""
    return choose(dtype, device).dtype


CACHE_ENV = "CAI_RAY_CACHE"
_READY = "_CONVERTED"  # written last: a directory without it is an unfinished conversion


def cache_root() -> Path | None:
    """Where converted models live: ``$CAI_RAY_CACHE`` or ``~/.cache/cai-ray``; None when disabled."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "cai-ray"


def plain_config(config):
    """A copy of a model config without the quantization settings of its source: a model loaded
    from a GGUF file carries ``quantization_config`` (``quant_method: gguf``), but its weights
    are plain tensors once loaded, and a loader that saw the setting would look for the GGUF
    file again."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def save_plain_lm(state_dict: dict, config, out_dir, tokenizer=None, generation_config=None) -> None:
    """A plain Hugging Face causal-LM directory from a full state dict: a fresh model of
    ``plain_config(config)`` is built on the meta device, the weights assigned (strictly), and saved
    (with the tokenizer and generation config when given).

    The directory is saved ready for inference whatever training needed: ``use_cache`` is true in
    both ``config.json`` and ``generation_config.json``. (Training turns the cache off; a model
    exported with that setting makes every ``generate`` recompute the whole sequence per token.)"""
    from transformers import AutoModelForCausalLM

    config = plain_config(config)
    config.use_cache = True
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(state_dict, strict=True, assign=True)
    fresh.tie_weights()
    fresh.config.dtype = next(v.dtype for v in state_dict.values() if v.is_floating_point())
    gen = copy.deepcopy(generation_config or fresh.generation_config)
    gen.use_cache = True
    fresh.generation_config = gen
    # Newer transformers write nothing from a process whose torch.distributed rank is not 0 (a
    # Ray Train worker converting a GGUF model, say), silently; this save is always meant.
    fresh.should_save_on_this_rank = lambda is_main_process=True: True
    fresh.save_pretrained(out_dir)
    if not (Path(out_dir) / "config.json").is_file():
        raise OSError(f"saving the model to {out_dir} wrote no config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def converted_dir(src: ModelSource) -> Path | None:
    """The cache directory of a GGUF source's dequantized copy (None: no GGUF, or caching off)."""
    root = cache_root()
    if root is None or not src.gguf_file:
        return None
    f = (Path(src.path) / src.gguf_file).resolve()
    st = f.stat()
    import transformers

    key = f"{f}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return root / "gguf" / f"{f.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _convert(src: ModelSource, target: Path) -> None:
    """Dequantize ``src`` once and write it (fp32 weights + tokenizer) to ``target``, atomically:
    into a temporary sibling first, renamed into place when complete. Concurrent converters (the
    actors of one pool starting together) each write their own copy; the first rename wins."""
    target.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache fails here, before the load
    print(f"[model] first use of {src.gguf_file}: dequantizing it once into {target}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = _load_model(src, torch.float32, torch.device("cpu"))
        save_plain_lm(model.state_dict(), model.config, tmp, _load_tokenizer(src), model.generation_config)
        (tmp / _READY).write_text(f"{Path(src.path) / src.gguf_file}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable
        if target.exists() and not _ready(target):  # an unfinished or broken copy: move it aside
            target.rename(tmp.with_name(tmp.name + "-broken"))
        try:
            tmp.rename(target)
        except OSError:
            if not _ready(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + "-broken"), ignore_errors=True)


def _ready(target: Path) -> bool:
    """A finished conversion: the marker (written last) and the model's config are there."""
    return (target / _READY).is_file() and (target / "config.json").is_file()


def plain_source(src: ModelSource) -> ModelSource:
    """A GGUF source → its converted copy in the cache (converting it the first time); any other
    source, or caching off, as it is. A cache that cannot be written falls back to the GGUF file."""
    target = converted_dir(src)
    if target is None:
        return src
    if not _ready(target):
        try:
            _convert(src, target)
        except OSError as e:
            warnings.warn(f"model {src.label!r}: could not cache its dequantized copy under {target.parent} "
                          f"({e}); loading the GGUF file each time instead — set {CACHE_ENV} to a writable "
                          "directory, or to 'off'", stacklevel=2)
            return src
    return replace(src, path=str(target), gguf_file=None)


def prepare_model(spec: str) -> ModelSource:
    """Resolve ``spec`` and, for a GGUF model, dequantize it into the cache now: called on the
    driver before a pool of actors or training workers starts, so they do not all convert it
    at once, and a bad spec fails in one line there."""
    return plain_source(resolve_model(spec))


def load_tokenizer(spec_or_source: str | ModelSource):
    """The source's tokenizer, set up for batched generation: left padding, a pad token."""
    return _load_tokenizer(plain_source(_source(spec_or_source)))


def _load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise EngineError(f"model {src.label!r}: could not load its tokenizer from {src.path}: {e}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec_or_source: str | ModelSource, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "auto"):
    """The source's causal LM on ``device`` in ``dtype`` (GGUF weights are dequantized to it)."""
    dev = resolve_device(device)
    return _load_model(plain_source(_source(spec_or_source)), resolve_dtype(dtype, dev), dev)


def _load_model(src: ModelSource, dtype: torch.dtype, dev: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise EngineError(f"model {src.label!r}: could not load it from {src.path}: {e}") from e
    return model.to(dev)


def chat_prompt_ids(tokenizer, conversation) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant-turn header: how every
    engine and every scorer of answers encodes a prompt, so their token positions agree."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
