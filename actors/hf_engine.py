"""The transformers backend of the engine protocol: CPU here, GPU elsewhere (docs/engines.md).

Batches are chat-templated, sorted by length into micro-batches of at most
``cfg.batch_size`` rows (less padding waste), LEFT padded, and run through
``model.generate`` (or one prefill forward pass for ``choice_logprobs``); results
come back in input order. A bad row (over-long prompt, broken conversation, a
row the model chokes on) becomes a failed :class:`Generation` / a NaN row; it
never fails the batch.

Shared prefixes (``cfg.prefix_cache``, see :mod:`actors.prefix_cache`): when the rows of a
micro-batch share at least ``cfg.min_prefix_tokens`` leading tokens, that prefix is prefilled
once (or reused from the previous micro-batch or call), its keys/values are copied to every
row, and only the suffixes run, padded in the middle. ``choice_logprobs`` also keeps rows that
share a longer prefix among themselves (the two orders of a judged pair) in one micro-batch and
prefills each such group's prefix once. ``engine.stats`` counts what it saved.

Reproducibility: with ``params.seed`` set, ``torch.manual_seed(seed)`` runs once per
``generate`` call and its micro-batches continue that random stream, so sampled outputs repeat
exactly for the same call (same rows, same ``batch_size``) and copies of one prompt in different
micro-batches differ; the same row in a different call may differ.
Greedy outputs do not depend on batch composition (padding is masked and position
ids follow the attention mask), nor on the prefix cache — up to float rounding, which
in bfloat16 can flip a near-tie token now and then, as batching itself can. With the
prefix cache that rounding also depends on how the kept prefix was computed (afresh,
or extended/cropped from the previous micro-batch's), so a fresh engine given the same
calls repeats them exactly, but one warmed up by other calls may differ at that level.
"""
from __future__ import annotations

import math
import time

import torch

from actors.base import EngineError, Generation, SamplingParams
from actors.config import EngineConfig
from actors.models import chat_prompt_ids, choose, load_causal_lm, load_tokenizer, resolve_device, resolve_model
from actors.prefix_cache import (
    STAT_KEYS,
    PrefixCache,
    cache_kwarg,
    group_prefix_lens,
    new_cache,
    pack_groups,
    pad_middle,
    positions_from_mask,
    prefix_groups,
    select_rows,
    shared_prefix_len,
    supports_prefix_cache,
)

# End-of-turn markers of common chat templates; each one the template uses also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class _RowStreamer:
    """A ``transformers`` streamer for a whole micro-batch: ``generate`` hands it the prompt first,
    then one new token per row at every step; each step goes to ``on_tokens(row, [token])`` with the
    row's index in the caller's input (tokens after a row's end of turn are padding: the caller's
    decoding stops at the first stop token, as ``_finish`` does)."""

    def __init__(self, rows: list[int], on_tokens):
        self.rows, self.on_tokens, self.prompt_seen = rows, on_tokens, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, tok in zip(self.rows, value.reshape(-1).tolist()):
            self.on_tokens(row, [int(tok)])

    def end(self) -> None:
        pass


class _RowStop:
    """A ``transformers`` stopping criterion: ``should_stop(row)`` (the row's index in the caller's
    input) ends that row now, as an end of turn would; once every row has ended, decoding stops."""

    def __init__(self, rows: list[int], should_stop):
        self.rows, self.should_stop = rows, should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([bool(self.should_stop(row)) for row in self.rows], device=input_ids.device)


class TransformersEngine:
    """``Engine`` on a Hugging Face causal LM. ``name`` is ``transformers:<model label>``."""

    def __init__(self, cfg: EngineConfig):
        self.cfg, started = cfg, time.time()
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        self.source = resolve_model(cfg.model)
        self.device = resolve_device(cfg.device)
        self.precision = choose(cfg.dtype, self.device)
        self.model = load_causal_lm(self.source, self.precision.dtype, self.device).eval()
        self.tokenizer = load_tokenizer(cfg.tokenizer or self.source)
        self.name = f"transformers:{self.source.label}"
        self.load_s = round(time.time() - started, 1)
        print(f"[engine] {self.name} on {self.device.type}, {self.precision}, "
              f"{torch.get_num_threads()} threads, loaded in {self.load_s} s", flush=True)
        self.pad_id = self.tokenizer.pad_token_id
        self.cache_kwarg = cache_kwarg(self.model)
        self.stop_ids = self._stop_token_ids()
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.prefix = (PrefixCache(self.model, cfg.min_prefix_tokens, self.stats)
                       if cfg.prefix_cache and supports_prefix_cache(self.model) else None)
        self.policy_version = 0  # which weights generated what follows (RL rollouts; see load_weights)

    # ---------------------------------------------------------------- weights (RL)
    def load_weights(self, state_dict: dict, version: int) -> None:
        """Replace every weight in place with an RL trainer's (same names and shapes as this
        model's ``state_dict``, cast to the engine's dtype) and tag later generations with
        ``version``, which must grow. The prefix cache is emptied: it was computed with the old weights."""
        if version <= self.policy_version:
            raise EngineError(f"load_weights: version {version} is not newer than the loaded {self.policy_version}")
        own = self.model.state_dict()
        needed = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()
                                                                  if n in own}  # tied weights once
        missing = sorted(needed - set(state_dict))
        unknown = sorted(set(state_dict) - set(own))
        bad = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if missing or unknown or bad:
            raise EngineError(f"load_weights: the trainer's weights do not fit {self.name}: "
                              f"{len(missing)} missing (e.g. {missing[:2]}), {len(unknown)} unknown "
                              f"(e.g. {unknown[:2]}), {len(bad)} with other shapes (e.g. {bad[:2]})")
        with torch.no_grad():
            for k, t in own.items():
                if k in state_dict:
                    t.copy_(state_dict[k].to(device=t.device, dtype=t.dtype))
        if self.prefix is not None:
            self.prefix.clear()
        self.policy_version = version

    # ---------------------------------------------------------------- prompts
    def _stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS, the model's generation-config EOS, and the chat template's end of turn."""
        ids: set[int] = set()
        for x in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            ids.update(x if isinstance(x, (list, tuple)) else [] if x is None else [x])
        template, vocab = str(self.tokenizer.chat_template or ""), self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab)
        return sorted(ids)

    def _encode(self, conversation) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant-turn header."""
        return chat_prompt_ids(self.tokenizer, conversation)

    def count_tokens(self, conversation) -> int:
        """Prompt length in tokens, exactly as ``generate`` would see it."""
        return len(self._encode(conversation))

    def _encode_all(self, conversations, limit: int) -> tuple[list, dict[int, str]]:
        """(ids per row, {row: error reason}) — rows over ``limit`` tokens or unencodable are errors."""
        encoded, errors = [], {}
        for i, conv in enumerate(conversations):
            try:
                ids = self._encode(conv)
            except Exception as e:  # noqa: BLE001 — a malformed conversation is one bad row
                encoded.append(None)
                errors[i] = f"bad_conversation: {type(e).__name__}: {e}"
                continue
            encoded.append(ids)
            if len(ids) > limit:
                errors[i] = f"prompt_too_long: {len(ids)} tokens > limit {limit}"
        return encoded, errors

    def _micro_batches(self, rows: list[int], encoded: list) -> list[list[int]]:
        """Row indices sorted by prompt length (longest first), cut into chunks of ``batch_size``."""
        order = sorted(rows, key=lambda i: -len(encoded[i]))
        size = max(1, int(self.cfg.batch_size))
        return [order[k:k + size] for k in range(0, len(order), size)]

    def _pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = [[self.pad_id] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return (torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device))

    def _batch_inputs(self, rows: list[list[int]]):
        """(ids, attention mask, cache or None) of the full prompts. With a shared prefix the cache
        holds its keys/values for every row and the rows are ``[prefix][pads][suffix]``; the model
        must then run ``ids[:, cache length:]`` only. Without one: left padded, no cache."""
        n = shared_prefix_len(rows, self.cfg.min_prefix_tokens) if self.prefix is not None else 0
        if not n:
            ids, mask = self._pad_left(rows)
            self.stats["prefill_tokens"] += ids.numel()
            return ids, mask, None
        cache = self.prefix.batch_cache(rows[0][:n], len(rows))
        ids, mask = pad_middle(rows, n, self.pad_id)
        self.stats["prefill_tokens"] += len(rows) * (len(ids[0]) - n)
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), cache

    @staticmethod
    def _run_chunk(chunk: list[int], fn, on_error):
        """``fn(chunk)``; if it raises, ``fn`` row by row, ``on_error(exc)`` for the rows that still fail."""
        try:
            return fn(chunk)
        except Exception:  # noqa: BLE001 — retry alone to isolate the bad row(s)
            results = []
            for i in chunk:
                try:
                    results.extend(fn([i]))
                except Exception as e:  # noqa: BLE001
                    results.append(on_error(e))
            return results

    # ---------------------------------------------------------------- generate
    def generate(self, conversations, params: SamplingParams, on_tokens=None, should_stop=None) -> list[Generation]:
        """One assistant reply per conversation, in input order (see the module docstring).
        ``on_tokens(row, token_ids)``, when given, is called as decoding goes with each row's newly
        generated tokens (its input index), for streaming servers. ``should_stop(row)``, when given,
        is asked at every decoding step (and before each micro-batch): a row it answers true for is
        ended at once and comes back failed with ``cancelled`` (a server's client that went away);
        decoding stops as soon as every row of the micro-batch has ended."""
        if params.max_new_tokens < 1:
            raise EngineError(f"sampling.max_new_tokens must be ≥ 1, got {params.max_new_tokens}")
        limit = self.cfg.max_model_len - params.max_new_tokens
        encoded, errors = self._encode_all(conversations, limit)
        out: list[Generation | None] = [Generation.failed(errors[i]) if i in errors else None
                                        for i in range(len(conversations))]
        ok = [i for i in range(len(conversations)) if i not in errors]
        if params.seed is not None:  # once per call: micro-batches continue one random stream, so
            torch.manual_seed(params.seed)  # copies of a prompt in different micro-batches differ
        for chunk in self._micro_batches(ok, encoded):
            if should_stop is not None:
                chunk = [i for i in chunk if not should_stop(i)]
                if not chunk:
                    continue
            results = self._run_chunk(
                chunk, lambda rows: self._generate_rows([encoded[i] for i in rows], params,
                                                        _RowStreamer(rows, on_tokens) if on_tokens else None,
                                                        _RowStop(rows, should_stop) if should_stop else None),
                lambda e: Generation.failed(f"generate_error: {type(e).__name__}: {e}"))
            for i, g in zip(chunk, results):
                out[i] = g
        if should_stop is not None:
            out = [Generation.failed("cancelled") if g is None or (g.error is None and should_stop(i)) else g
                   for i, g in enumerate(out)]
        return out

    def _generate_rows(self, rows: list[list[int]], params: SamplingParams, streamer=None,
                       stop: _RowStop | None = None) -> list[Generation]:
        ids, mask, cache = self._batch_inputs(rows)
        # use_cache explicitly: a model saved with training's ``use_cache: false`` would otherwise
        # recompute the whole sequence at every new token
        kwargs = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      use_cache=True)
        if cache is not None:  # generate runs the uncached tokens only; positions follow the mask
            kwargs[self.cache_kwarg] = cache
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.greedy:
            kwargs.update(do_sample=False)
        else:  # plain temperature / nucleus sampling: top_k=0 switches off transformers' default top-k of 50
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stop is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = seqs[:, ids.shape[1]:].tolist()
        return [self._finish(len(r), toks, params) for r, toks in zip(rows, new)]

    def _finish(self, prompt_tokens: int, toks: list[int], params: SamplingParams) -> Generation:
        """Cut at the first stop token, then at the first stop string; count and decode."""
        stops = set(self.stop_ids)
        cut = next((k for k, t in enumerate(toks) if t in stops), None)
        used, reason = (toks, "length") if cut is None else (toks[:cut + 1], "stop")
        text = self.tokenizer.decode(used, skip_special_tokens=True)
        hits = [p for p in (text.find(s) for s in params.stop if s) if p >= 0]
        if hits:
            text, reason = text[:min(hits)], "stop"
            used = used[:self._tokens_until_stop(used, params.stop)]
        return Generation(text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=len(used),
                          finish_reason=reason, extra={"policy_version": self.policy_version, "token_ids": used})

    def _tokens_until_stop(self, toks: list[int], stop) -> int:
        """Fewest leading tokens whose decoded text already contains a stop string (binary search)."""
        lo, hi = 1, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            text = self.tokenizer.decode(toks[:mid], skip_special_tokens=True)
            lo, hi = (lo, mid) if any(s and s in text for s in stop) else (mid + 1, hi)
        return hi

    # ---------------------------------------------------------------- choices
    def _choice_token_ids(self, choices: list[str]) -> list[int]:
        """Each choice → its first token as it would start an assistant reply ("A" → "A", "(A)" → "(")."""
        if not choices:
            raise EngineError("choice_logprobs: no choices given — pass e.g. ['A', 'B']")
        firsts = []
        for c in choices:
            ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise EngineError(f"choice_logprobs: choice {c!r} encodes to no tokens — pass non-empty choices")
            firsts.append(ids[0])
        if len(set(firsts)) < len(firsts):
            shown = ", ".join(f"{c!r}→{self.tokenizer.convert_ids_to_tokens(t)!r}" for c, t in zip(choices, firsts))
            raise EngineError(f"choice_logprobs: choices share a first token ({shown}) — use choices that differ "
                              "in their first token, e.g. 'A'/'B' rather than '(A)'/'(B)'")
        return firsts

    def choice_logprobs(self, conversations, choices: list[str]) -> list[list[float]]:
        """log P(first token of each choice) as the assistant's next token, in ``choices`` order.

        One prefill forward pass per micro-batch, no sampling; the log-probs are over the full
        vocabulary, so ``exp`` of a row sums to ≤ 1. A row that is too long (or fails) comes back
        as all-NaN: callers treat NaN as a row error.
        """
        choice_ids = self._choice_token_ids(list(choices))
        encoded, errors = self._encode_all(conversations, self.cfg.max_model_len - 1)
        nan_row = [math.nan] * len(choice_ids)
        out = [list(nan_row) for _ in conversations]
        ok = [i for i in range(len(conversations)) if i not in errors]
        if self.prefix is not None:  # micro-batches that keep rows sharing a prefix together
            groups = prefix_groups([encoded[i] for i in ok], self.cfg.min_prefix_tokens)
            lengths = [len(encoded[i]) for i in ok]
            chunks = [[ok[j] for j in c] for c in pack_groups(groups, lengths, self.cfg.batch_size)]
        else:
            chunks = self._micro_batches(ok, encoded)
        for chunk in chunks:
            rows = self._run_chunk(chunk, lambda rs: self._prefill([encoded[i] for i in rs], choice_ids),
                                   lambda e: list(nan_row))
            for i, r in zip(chunk, rows):
                out[i] = r
        return out

    def _prefill(self, rows: list[list[int]], choice_ids: list[int]) -> list[list[float]]:
        groups = prefix_groups(rows, self.cfg.min_prefix_tokens) if self.prefix is not None else []
        if 0 < len(groups) < len(rows):  # some rows share more than the prefix all of them share
            logits = self._grouped_last_logits(rows, groups)
        else:
            logits = self._last_logits(*self._uncached(*self._batch_inputs(rows)))
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[:, choice_ids].tolist()

    @staticmethod
    def _uncached(ids, mask, cache):
        """(the ids the model still has to run — those after ``cache``'s tokens —, mask, cache)."""
        return ids[:, cache.get_seq_length() if cache is not None else 0:], mask, cache

    def _last_logits(self, new_ids, mask, cache) -> torch.Tensor:
        """Next-token logits after each row: ``new_ids`` are the last columns of ``mask``, the
        tokens before them are in ``cache`` (filled further as the model runs, when given)."""
        positions = positions_from_mask(mask)[:, mask.shape[1] - new_ids.shape[1]:]  # as if unpadded
        with torch.inference_mode():
            return self.model(input_ids=new_ids, attention_mask=mask, position_ids=positions,
                              use_cache=cache is not None, logits_to_keep=1,
                              **{self.cache_kwarg: cache}).logits[:, -1, :]

    def _grouped_last_logits(self, rows: list[list[int]], groups: list[list[int]]) -> torch.Tensor:
        """Each group's shared prefix once (on the all-rows prefix, as ``_batch_inputs`` gives it),
        its keys/values copied to the group's rows, then every row's remaining tokens."""
        cuts = group_prefix_lens(rows, groups)
        ids, mask, cache = self._uncached(*self._batch_inputs([rows[g[0]][:n] for g, n in zip(groups, cuts)]))
        cache = cache if cache is not None else new_cache(self.model)
        self._last_logits(ids, mask, cache)  # fills the cache with the group prefixes
        owner, cut = [0] * len(rows), [0] * len(rows)
        for k, (g, n) in enumerate(zip(groups, cuts)):
            for i in g:
                owner[i], cut[i] = k, n
        index = torch.tensor(owner, device=self.device)
        tail_ids, tail_mask = self._pad_left([r[c:] for r, c in zip(rows, cut)])
        full = torch.cat([mask.index_select(0, index), tail_mask], dim=1)  # [group prefix][pads][row's rest]
        self.stats["grouped_batches"] += 1
        self.stats["prefill_tokens"] += tail_ids.numel()
        cache = select_rows(self.model, cache, index)
        return self._last_logits(tail_ids, full, cache)
