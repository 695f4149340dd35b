"""Constitutions: the written principles that drive critique, revision and AI feedback.

A constitution is a YAML file (see ``constitutions/default.yaml``) with a list of
principles, each carrying three prompts — ``critique``, ``revision`` and
``comparison`` (a question a judge answers with "(A)" or "(B)") — plus optional
few-shot critique→revision conversations. JSON files in the Hugging Face CAI
replication format (``{"constitutions": [{"critic", "revision"}], "system_chat"}``)
are imported too. Every problem raises ``ConfigError`` naming the file, the
principle and the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workflows.core.errors import ConfigError

SUFFIXES = (".yaml", ".yml", ".json")
PRINCIPLE_TEXT_FIELDS = ("critique", "revision", "comparison")
PRINCIPLE_FIELDS = ("id", *PRINCIPLE_TEXT_FIELDS, "tags")
TOP_FIELDS = ("name", "version", "description", "principles", "few_shot")
ROLES = ("system", "user", "assistant")
_ID_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Principle:
    """One principle: how to critique, how to revise, and how to compare two answers."""

    id: str
    critique: str
    revision: str
    comparison: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Constitution:
    """A validated constitution. ``source`` is the file it was loaded from."""

    name: str
    version: str
    principles: tuple[Principle, ...]
    few_shot: tuple[tuple[dict, ...], ...] = ()
    description: str = ""
    source: str = ""

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def get(self, principle_id: str) -> Principle:
        """The principle with this id; ``KeyError`` naming the known ids otherwise."""
        for p in self.principles:
            if p.id == principle_id:
                return p
        close = difflib.get_close_matches(str(principle_id), self.ids, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(f"unknown principle id {principle_id!r} in constitution {self.name!r} "
                       f"({self.source or 'in memory'}); {hint}known ids: {', '.join(self.ids)}")


# ----------------------------------------------------------------------------- locating

def _shipped_dirs() -> list[Path]:
    """Folders holding the shipped constitutions (repo checkout first, then installed)."""
    dirs = [Path(__file__).resolve().parents[2] / "constitutions"]
    try:
        dirs += [Path(p) for p in importlib.util.find_spec("constitutions").submodule_search_locations or ()]
    except (AttributeError, ImportError, ValueError):  # not installed / not a package
        pass
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def shipped_names() -> list[str]:
    """Names of the constitutions that ship with the project (e.g. default, harmless)."""
    return sorted({p.stem for d in _shipped_dirs() for p in d.iterdir() if p.suffix in SUFFIXES})


def resolve_constitution_path(name_or_path: str) -> Path:
    """A shipped name ("default") or a path to a .yaml/.yml/.json file → an existing file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    names = shipped_names()
    fix = f"use a shipped constitution ({', '.join(names)}) or a path to a .yaml/.yml/.json file"
    if path.suffix.lower() in SUFFIXES:
        if path.is_file():
            return path
        raise ConfigError(text, "file not found", fix)
    if path.is_file():
        raise ConfigError(text, f"unsupported file type {path.suffix or '(no suffix)'!r}", fix)
    if "/" not in text and "\\" not in text:
        found = [d / f"{text}{s}" for d in _shipped_dirs() for s in SUFFIXES if (d / f"{text}{s}").is_file()]
        if found:
            return found[0]
        fix = "".join(f"did you mean {c!r}? Or " for c in difflib.get_close_matches(text, names, n=1)) + fix
    raise ConfigError(text, "no such constitution", fix)


def _display(path: Path) -> str:
    """A short name for messages: relative to the working directory when possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- loading

def _parse(path: Path, where: str) -> Any:
    """Read ``path`` as UTF-8 and parse it as YAML or JSON, with positions in errors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(where, f"cannot read file ({e.strerror or e})", "check the path and permissions")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(where, f"is not UTF-8 text (invalid byte at offset {e.start})",
                          "re-save the file with UTF-8 encoding")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}:{e.lineno}:{e.colno}", f"invalid JSON: {e.msg}",
                              "fix the syntax at that line and column")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{pos}", f"invalid YAML: {problem}",
                          "fix the syntax at that line and column (quote text containing ': ' or '#')")


def _is_hf(data: Any) -> bool:
    """True for the Hugging Face CAI JSON format (a mapping or a bare list of critic/revision)."""
    if isinstance(data, list):
        return bool(data) and all(isinstance(x, dict) and ("critic" in x or "critique" in x) for x in data)
    return isinstance(data, dict) and "constitutions" in data and "principles" not in data


def load_constitution(name_or_path: str | Path) -> Constitution:
    """Load and validate a constitution by shipped name or path (.yaml/.yml/.json)."""
    path = resolve_constitution_path(str(name_or_path))
    where = _display(path)
    data = _parse(path, where)
    hf = path.suffix.lower() == ".json" and _is_hf(data)
    c = import_hf_json(data, where) if hf else constitution_from_dict(data, where)
    return dataclasses.replace(c, source=str(path))


# ----------------------------------------------------------------------------- validation

def _reject_unknown(data: dict, known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            raise ConfigError(f"{where}.{key}", "unknown field", hint)


def _text(value: Any, where: str, fix: str) -> str:
    """A required, non-empty string (surrounding whitespace stripped)."""
    if value is None:
        raise ConfigError(where, "is missing", fix)
    if not isinstance(value, str):
        raise ConfigError(where, f"must be a string, got {type(value).__name__} {value!r}",
                          "write it as quoted text")
    if not value.strip():
        raise ConfigError(where, "is empty", fix)
    return value.strip()


def _principle(item: Any, i: int, where: str) -> Principle:
    """Validate ``principles[i]``; ``where`` is ``FILE: principles``-style prefix."""
    here = f"{where}[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(here, f"must be a mapping, got {type(item).__name__} {item!r}",
                          f"give each principle the fields {', '.join(PRINCIPLE_FIELDS)}")
    pid = _text(item.get("id"), f"{here}.id", "add a unique kebab-case `id:` such as harmful-content")
    if not _ID_RE.match(pid):
        slug = re.sub(r"[^a-z0-9]+", "-", pid.lower()).strip("-") or "my-principle"
        raise ConfigError(f"{here}.id", f"{pid!r} is not kebab-case", f"use lowercase words joined by '-', e.g. {slug!r}")
    here = f"{here} (id={pid})"
    _reject_unknown(item, PRINCIPLE_FIELDS, here)
    texts = {f: _text(item.get(f), f"{here}.{f}", f"write the {f} prompt as non-empty text")
             for f in PRINCIPLE_TEXT_FIELDS}
    tags = item.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise ConfigError(f"{here}.tags", f"got {tags!r}", "write tags as a list of words, e.g. [harmless]")
    return Principle(id=pid, tags=tuple(t.strip() for t in tags), **texts)


def _check_unique(principles: list[Principle], where: str) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.id in seen:
            raise ConfigError(f"{where}: principles[{i}] (id={p.id}).id",
                              f"duplicate id {p.id!r} (also used by principles[{seen[p.id]}])",
                              "give every principle a unique id")
        seen[p.id] = i


def _message(msg: Any, where: str) -> dict:
    if not isinstance(msg, dict):
        raise ConfigError(where, f"must be a mapping, got {type(msg).__name__} {msg!r}",
                          "write each turn as {role: user, content: ...}")
    _reject_unknown(msg, ("role", "content"), where)
    role = msg.get("role")
    if role not in ROLES:
        raise ConfigError(f"{where}.role", f"got {role!r}", f"use one of {', '.join(ROLES)}")
    content = _text(msg.get("content"), f"{where}.content", "write the turn's text")
    return {"role": role, "content": content}


def _conversation(conv: Any, where: str) -> tuple[dict, ...]:
    """Validate one few-shot conversation: optional leading system turn, then
    user/assistant alternating, starting with user and ending with assistant."""
    if not isinstance(conv, list) or not conv:
        raise ConfigError(where, f"must be a non-empty list of turns, got {conv!r}",
                          "write a list of {role, content} turns")
    msgs = [_message(m, f"{where}[{j}]") for j, m in enumerate(conv)]
    start = 1 if msgs[0]["role"] == "system" else 0
    for j in range(start, len(msgs)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if msgs[j]["role"] != want:
            raise ConfigError(f"{where}[{j}].role", f"is {msgs[j]['role']!r} but {want!r} was expected",
                              "turns must alternate user/assistant, starting with user "
                              "(a system turn is allowed only first)")
    if msgs[-1]["role"] != "assistant":
        raise ConfigError(where, "does not end with an assistant turn",
                          "end each conversation with the assistant's (revised) answer")
    return tuple(msgs)


def _conversations(value: Any, where: str) -> tuple[tuple[dict, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(where, f"must be a list of conversations, got {type(value).__name__}",
                          "write a list of conversations, each a list of {role, content} turns")
    return tuple(_conversation(c, f"{where}[{k}]") for k, c in enumerate(value))


def constitution_from_dict(data: Any, where: str) -> Constitution:
    """Validate a parsed constitution (our YAML schema); ``where`` names its file."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"top level must be a mapping, got {type(data).__name__}",
                          "start the file with `name:`, `version:` and `principles:` (see constitutions/default.yaml)")
    _reject_unknown(data, TOP_FIELDS, f"{where}: top level")
    name = _text(data.get("name", Path(where).stem), f"{where}: name", "write `name: <short-name>`")
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, (int, float, str)) or not str(version).strip():
        raise ConfigError(f"{where}: version", f"got {version!r}", "write e.g. `version: 1`")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description", f"got {type(description).__name__}", "write it as text")
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: principles", "no principles" if not items else f"got {type(items).__name__}",
                          "add a list of principles, each with id, critique, revision and comparison")
    principles = [_principle(p, i, f"{where}: principles") for i, p in enumerate(items)]
    _check_unique(principles, where)
    return Constitution(name=name, version=str(version).strip(), principles=tuple(principles),
                        few_shot=_conversations(data.get("few_shot"), f"{where}: few_shot"),
                        description=description.strip(), source=where)


# ----------------------------------------------------------------------------- HF import

def _hf_comparison(critic: str) -> str:
    """A judge question derived from a critique request."""
    return ("Which of these assistant responses better avoids the problems that this critique "
            f"request looks for: \"{critic}\" Choose the response with fewer such problems.")


def _hf_principle(item: Any, i: int, where: str) -> Principle:
    here = f"{where}: constitutions[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(here, f"must be a mapping, got {type(item).__name__}",
                          'write {"critic": "...", "revision": "..."}')
    _reject_unknown(item, ("critic", "critique", "revision"), here)
    key = "critic" if "critic" in item else "critique"
    critic = _text(item.get(key), f"{here}.{key}", "write the critique request as non-empty text")
    revision = _text(item.get("revision"), f"{here}.revision", "write the revision request as non-empty text")
    return Principle(id=f"hf-{i + 1:03d}", critique=critic, revision=revision,
                     comparison=_hf_comparison(critic), tags=("hf",))


def import_hf_json(data: dict, where: str) -> Constitution:
    """Import Hugging Face's CAI replication JSON (``constitutions`` + ``system_chat``).

    Principles get ids ``hf-001``, ``hf-002``, … and a comparison question derived from
    the critique; ``system_chat`` becomes the few-shot conversations."""
    if isinstance(data, list):
        data = {"constitutions": data}
    if not isinstance(data, dict):
        raise ConfigError(where, f"top level must be a mapping, got {type(data).__name__}",
                          'expected {"constitutions": [...], "system_chat": [...]}')
    _reject_unknown(data, ("constitutions", "system_chat"), f"{where}: top level")
    items = data.get("constitutions")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: constitutions", "no principles",
                          'add a list of {"critic": "...", "revision": "..."} entries')
    principles = tuple(_hf_principle(p, i, where) for i, p in enumerate(items))
    return Constitution(name=Path(where).stem, version="1", principles=principles,
                        few_shot=_conversations(data.get("system_chat"), f"{where}: system_chat"),
                        description=f"Imported from Hugging Face CAI JSON ({len(principles)} principles)",
                        source=where)


# ----------------------------------------------------------------------------- use

def sample_principles(constitution: Constitution, key: str, n: int, seed: int) -> list[str]:
    """``n`` principle ids for row ``key``: deterministic in (seed, key, n) alone.

    Without replacement when ``n <= len(principles)``, with replacement otherwise."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    ids = constitution.ids
    if n > len(ids):
        return [rng.choice(ids) for _ in range(n)]
    return rng.sample(ids, n)


def describe(constitution: Constitution) -> str:
    """A short human summary: name, version, principle count and ids, few-shot count."""
    c = constitution
    return (f"constitution {c.name!r} v{c.version}" + (f" ({c.source})" if c.source else "")
            + f"\n  {len(c.principles)} principles: {', '.join(c.ids)}"
            + f"\n  {len(c.few_shot)} few-shot conversation(s)")


def check_main(path: str) -> int:
    """``cai validate-constitution FILE``: print a summary and OK (0); a bad file raises ``ConfigError``
    (the CLI prints it in one line and exits 2, like every other bad input)."""
    c = load_constitution(path)
    print(describe(c))
    print("OK")
    return 0
