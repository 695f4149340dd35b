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
"""
from __future__ import annotations

import torch

# engine.stats: micro-batches run on a shared prefix; those that reused the stored prefix; prefix
# tokens taken from it; prefix tokens run through the model (batch 1); and all prompt tokens the
# model ran, pads included (prefix once + suffixes per row, or the left-padded batch without a prefix).
STAT_KEYS = ("prefix_batches", "prefix_hits", "prefix_tokens_reused", "prefix_tokens_computed", "prefill_tokens")


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


# ---------------------------------------------------------------- the model side
def _new_cache(model, kv=None):
    from transformers import DynamicCache

    return DynamicCache(kv, config=model.config.get_text_config(decoder=True))


def supports_prefix_cache(model) -> bool:
    """True when the model's default cache is all plain growing layers, and ``generate`` would
    accept a cache passed in (no ``cache_implementation`` forced by its generation config)."""
    from transformers.cache_utils import DynamicLayer

    try:
        layers = _new_cache(model).layers
    except Exception:  # noqa: BLE001 — an exotic config: just do without the cache
        return False
    forced = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    return bool(layers) and forced is None and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """The last prefix computed (token ids + per-layer keys/values at batch size 1)."""

    def __init__(self, model, min_tokens: int, stats: dict):
        self.model, self.min_tokens, self.stats = model, int(min_tokens), stats
        self.ids: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prefix_kv(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of ``prefix`` (batch 1), reusing the stored prefix as far as it agrees
        (at least ``min_tokens`` of it) and running the model on the rest only."""
        reuse = common_prefix_len(self.ids, prefix)
        if reuse < self.min_tokens:
            reuse = 0
        kv = [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in self.kv] if reuse else None
        if reuse < len(prefix):
            with torch.inference_mode():
                cache = _new_cache(self.model, kv)
                self.model(input_ids=torch.tensor([prefix[reuse:]], device=self.model.device),
                           position_ids=torch.arange(reuse, len(prefix), device=self.model.device)[None],
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
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
            return _new_cache(self.model, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])
