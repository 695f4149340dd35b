"""``--set KEY=VALUE``: one setting of a recipe changed from the command line, before the recipe is
validated — so an override is typed and checked exactly as the YAML is.

``KEY`` is dotted: its first part is a top-level recipe field (``seed``, ``run_dir``, ``ray``, ...) or
a stage's name (its ``name:``, else its ``stage:``); the rest walks that mapping, a number indexing
a list (``preference.judges.0.model=...``). A missing mapping on the way is created; a misspelt
field is caught by the recipe's validation, which names it and suggests the closest. ``VALUE`` is
read as YAML (``true``, ``8``, ``[a, b]``, ``{r: 16}``); an unquoted number YAML keeps as text
(``1e-5``) is a number; a quoted one stays text.
"""
from __future__ import annotations

import copy
import difflib
import re

import yaml

from workflows.core.errors import ConfigError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_value(text: str):
    """The value of ``KEY=VALUE`` as YAML would read it, with ``1e-5`` a number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("--set", f"{text!r} is not a YAML value ({getattr(e, 'problem', e)})",
                          "quote text with spaces or colons, e.g. --set name='my run'") from None
    if isinstance(value, str) and _NUMBER.fullmatch(text.strip()):
        return float(text)
    return value


def parse_set(item: str) -> tuple[list[str], object]:
    """``"sft.lr=1e-5"`` → (["sft", "lr"], 1e-05)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError("--set", f"{item!r} is not KEY=VALUE",
                          "write the stage's name and the dotted setting, e.g. --set sft.lr=1e-5")
    return [p.strip() for p in parts], parse_value(text)


def _stage_names(data: dict) -> dict[str, int]:
    names = {}
    for i, entry in enumerate(data.get("stages") or []):
        if isinstance(entry, dict) and "stage" in entry:
            names.setdefault(str(entry.get("name") or entry["stage"]), i)
    return names


def apply_overrides(data: dict, items: list[str], top_level: list[str]) -> dict:
    """A copy of the raw recipe mapping ``data`` with every ``--set`` item applied in order.
    ``top_level``: the recipe's own fields (a key naming neither one nor a stage is refused)."""
    out = copy.deepcopy(data if isinstance(data, dict) else {})
    for item in items:
        path, value = parse_set(item)
        stages = _stage_names(out)
        head = path[0]
        if head in stages:
            node, rest, where = out["stages"][stages[head]], path[1:], f"--set {head}"
            if not rest:
                raise ConfigError(f"--set {item}", "names a whole stage", f"name a setting, e.g. --set {head}.lr=1e-5")
        elif head in top_level and head != "stages":
            node, rest, where = out, path, "--set"
        else:
            known = list(stages) + [k for k in top_level if k != "stages"]
            close = difflib.get_close_matches(head, known, n=1)
            raise ConfigError(f"--set {item}", f"{head!r} is neither a stage of this recipe nor a recipe field",
                              f"did you mean {close[0]!r}?" if close else f"stages: {', '.join(stages)}")
        for i, part in enumerate(rest):
            last = i == len(rest) - 1
            where = f"{where}.{part}"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(where, f"the list has {len(node)} item(s)", f"index it 0–{len(node) - 1}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(where, f"cannot set a field inside {node!r}", "set the whole value instead")
    return out
