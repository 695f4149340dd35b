"""Shared-prefix KV caching for the transformers engine (the idea of automatic prefix caching).

The rows of one micro-batch often start with the same tokens: the constitution's few-shot
conversation of every critique/revision prompt, the fixed header of every judge prompt, the
two orders of one judged pair. Instead of prefilling that prefix once per row, the engine

1. takes the longest common token prefix of the micro-batch's rows (:func:`shared_prefix_len`;
   at least one token of every row is left over, so each row still yields its own logits);
2. gets the prefix's keys/values at batch size 1 from :class:`PrefixCache` — reused from the
   last prefix it computed when the two agree on their first tokens (cropped, and extended
   by the missing tokens only), else computed afresh;
3. spreads them over the batch (:meth:`PrefixCache.batch_cache`: a fresh cache of expanded
   views; a cache grows by concatenation, never in place, so the forward passes that follow
   leave the stored tensors as they are) and runs only the suffixes,
   padded *in the middle*: ``[prefix][pads][suffix]`` with attention mask ``1…1 0…0 1…1``
   (:func:`pad_middle`). Position ids follow the mask (``cumsum − 1``), so every row sees the
   positions it would see unpadded.

Only caches made purely of plain growing layers are supported (full attention, no sliding
window, no linear-attention state); :func:`supports_prefix_cache` says whether a model has them.

Groups (``choice_logprobs`` only): rows often share far more with *some* rows than with all,
e.g. the two orders of one judged pair share the conversation, the question and "(A) ".
:func:`prefix_groups` finds such groups and :func:`pack_groups` keeps each group in one
micro-batch; the engine then runs the groups' prefixes once each (on top of the all-rows
prefix above), copies each group's keys/values to its rows (:func:`select_rows`) and runs
the rows' remaining tokens, again padded in the middle.
"""
from __future__ import annotations

import torch

# engine.stats: micro-batches run on a shared prefix; those that reused the stored prefix; prefix
# tokens taken from it; prefix tokens run through the model (batch 1); and all prompt tokens the
# model ran, pads included (prefix once + suffixes per row, or the left-padded batch without a prefix).
# grouped_batches: micro-batches of ``choice_logprobs`` run as group prefixes, then per-row suffixes.
STAT_KEYS = ("prefix_batches", "prefix_hits", "prefix_tokens_reused", "prefix_tokens_computed", "prefill_tokens",
             "grouped_batches")


# ---------------------------------------------------------------- pure helpers
def common_prefix_len(a, b) -> int:
    """Number of leading items ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def batch_common_prefix_len(rows) -> int:
    """Longest common prefix of all ``rows`` (0 for no rows)."""
    if not rows:
        return 0
    n = len(rows[0])
    for r in rows[1:]:
        n = common_prefix_len(rows[0][:n], r)
        if n == 0:
            break
    return n


def shared_prefix_len(rows, min_tokens: int) -> int:
    """Prefix length worth caching for these rows: their common prefix, shortened so every row
    keeps ≥ 1 token of its own; 0 when that is shorter than ``min_tokens`` (or there are no rows)."""
    if not rows or min(len(r) for r in rows) < 2:
        return 0
    n = min(batch_common_prefix_len(rows), min(len(r) for r in rows) - 1)
    return n if n >= max(1, min_tokens) else 0


def pad_middle(rows, prefix_len: int, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, attention mask): ``[prefix][pads][suffix]`` per row, all of one width."""
    width = max(len(r) for r in rows) - prefix_len
    ids, mask = [], []
    for r in rows:
        suffix, pads = r[prefix_len:], width - (len(r) - prefix_len)
        ids.append(list(r[:prefix_len]) + [pad_id] * pads + list(suffix))
        mask.append([1] * prefix_len + [0] * pads + [1] * len(suffix))
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as if unpadded: ``cumsum(mask) − 1``, pads at 0 (they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def prefix_groups(rows, min_tokens: int) -> list[list[int]]:
    """Indices of ``rows`` grouped by a prefix their members share beyond the one all rows share.

    Rows are taken in token order (so rows with common starts are neighbours); a row joins the
    open group when it shares ≥ ``min_tokens`` more than the all-rows prefix with it *and* the
    group then saves at least as many tokens as before ((size − 1) × extra shared length); else
    it opens a new group. Judge prompts group by pair (both orders share the conversation, the
    question and "(A) "), or by first option when pairs of one prompt share a principle.
    Groups come back in row order of their first member, members in row order."""
    if not rows:
        return []
    base = batch_common_prefix_len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups, prefix, saved = [[order[0]]], len(rows[order[0]]), 0
    for i in order[1:]:
        first = rows[groups[-1][0]]
        n = min(prefix, common_prefix_len(first[:prefix], rows[i]))
        gain = len(groups[-1]) * (n - base)
        if n - base >= max(1, min_tokens) and gain >= saved:
            groups[-1].append(i)
            prefix, saved = n, gain
        else:
            groups.append([i])
            prefix, saved = len(rows[i]), 0
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def pack_groups(groups: list[list[int]], lengths, batch_size: int) -> list[list[int]]:
    """Micro-batches of ≤ ``batch_size`` row indices that keep groups together: groups sorted by
    their longest row (longest first, as plain micro-batches are), a group larger than a batch
    split into batch-sized pieces, pieces packed in that order."""
    size = max(1, int(batch_size))
    pieces = [g[k:k + size] for g in sorted(groups, key=lambda g: -max(lengths[i] for i in g))
              for k in range(0, len(g), size)]
    chunks: list[list[int]] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + len(piece) <= size:
            chunks[-1].extend(piece)
        else:
            chunks.append(list(piece))
    return chunks


def group_prefix_lens(rows, groups: list[list[int]]) -> list[int]:
    """Per group, the prefix its rows share (≤ the shortest row − 1, so each keeps a token of its
    own). A lone row gets the longest such prefix of the real groups (capped likewise), which
    keeps the two forward passes' widths even rather than saving anything for it."""
    lens = [min(batch_common_prefix_len([rows[i] for i in g]), min(len(rows[i]) for i in g) - 1)
            if len(g) > 1 else None for g in groups]
    longest = max((n for n in lens if n is not None), default=0)
    return [n if n is not None else min(longest, len(rows[g[0]]) - 1) for n, g in zip(lens, groups)]


# ---------------------------------------------------------------- the model side
def new_cache(model, kv=None):
    """A cache of the model's default (plain growing) kind: empty, or holding ``kv`` (per layer)."""
    from transformers import DynamicCache

    return DynamicCache(kv, config=model.config.get_text_config(decoder=True))


def select_rows(model, cache, index: torch.Tensor):
    """A fresh cache whose row ``r`` is ``cache``'s row ``index[r]`` (copies: rows repeat)."""
    return new_cache(model, [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                              for layer in cache.layers])


def cache_kwarg(model) -> str:
    """The keyword a model's ``forward``/``generate`` take a cache by: ``cache`` in newer
    transformers (which deprecate ``past_key_values``), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def supports_prefix_cache(model) -> bool:
    """True when the model's default cache is all plain growing layers, and ``generate`` would
    accept a cache passed in (no ``cache_implementation`` forced by its generation config)."""
    from transformers.cache_utils import DynamicLayer

    try:
        layers = new_cache(model).layers
    except Exception:  # noqa: BLE001 — an exotic config: just do without the cache
        return False
    forced = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    return bool(layers) and forced is None and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """The last prefix computed (token ids + per-layer keys/values at batch size 1)."""

    def __init__(self, model, min_tokens: int, stats: dict):
        self.model, self.min_tokens, self.stats = model, int(min_tokens), stats
        self.cache_kwarg = cache_kwarg(model)
        self.ids: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        """Forget the stored prefix (its keys/values belong to weights that just changed)."""
        self.ids, self.kv = [], []

    def prefix_kv(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of ``prefix`` (batch 1), reusing the stored prefix as far as it agrees
        (at least ``min_tokens`` of it) and running the model on the rest only."""
        reuse = common_prefix_len(self.ids, prefix)
        if reuse < self.min_tokens:
            reuse = 0
        kv = [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in self.kv] if reuse else None
        if reuse < len(prefix):
            with torch.inference_mode():
                cache = new_cache(self.model, kv)
                self.model(input_ids=torch.tensor([prefix[reuse:]], device=self.model.device),
                           position_ids=torch.arange(reuse, len(prefix), device=self.model.device)[None],
                           use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.stats["prefix_hits"] += bool(reuse)
        self.stats["prefix_tokens_reused"] += reuse
        self.stats["prefix_tokens_computed"] += len(prefix) - reuse
        self.stats["prefill_tokens"] += len(prefix) - reuse
        if reuse < len(self.ids) and reuse == len(prefix):
            # ``prefix`` is the start of the stored one: keep the longer; hand out the cropped view
            return kv
        self.ids, self.kv = list(prefix), kv
        return kv

    def batch_cache(self, prefix: list[int], batch: int):
        """A fresh cache holding ``prefix``'s keys/values for each of ``batch`` rows, as expanded
        views (no copy): forward passes grow it by concatenation, so the stored prefix stays intact
        (``test_prefix_is_reused_across_calls_and_survives_generate`` checks it)."""
        self.stats["prefix_batches"] += 1
        kv = self.prefix_kv(prefix)
        with torch.inference_mode():
            return new_cache(self.model, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])
