"""SFT job: supervised fine-tuning on the ``sft`` dataset (TRL conversational ``messages``),
cross-entropy on assistant tokens only, on Ray Train + DeepSpeed (``training.core``).

Outputs in the stage directory: ``<output>/`` (Hugging Face model + tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained``), ``metrics.jsonl`` (one line per optimizer step),
``loss.png``, ``train_summary.json`` and ``_SUCCESS``.
"""
from __future__ import annotations

from functools import partial

from actors.models import load_tokenizer
from training import core, runner
from training.config import SFTConfig
from training.data import collate_sft, tokenize_sft
from training.losses import IGNORE_INDEX, sequence_logprobs, sft_loss
from training.worker import JobSpec, load_items, setup_worker
from workflows.core.stage import StageContext


def _logits(engine, batch):
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _step(engine, batch):
    return sft_loss(_logits(engine, batch), batch["labels"]), {}


def _evaluate(engine, batch):
    logps = sequence_logprobs(_logits(engine, batch), batch["labels"])
    return {"nll": float(-logps.sum()), "tokens": float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}


def _summarize(sums):
    return {"eval_loss": sums["nll"] / max(sums["tokens"], 1.0)}


def _probe(engine, batch):
    return sequence_logprobs(_logits(engine, batch), batch["labels"]).tolist()


def train_loop(spec: JobSpec) -> None:
    """Ray Train worker entry: tokenize this worker's shard, then ``core.fit``."""
    cfg: SFTConfig = spec.cfg
    ws = setup_worker(spec)
    tok = load_tokenizer(spec.model)
    train, evals, counts = load_items(tokenize_sft, tok, spec)
    task = core.Task(model=core.load_lm(spec.model, cfg), train=train, eval=evals,
                     collate=partial(collate_sft, pad_id=tok.pad_token_id), step=_step, evaluate=_evaluate,
                     summarize=_summarize, probe=_probe,
                     export=lambda sd, d, module, extra: core.save_lm(sd, d, module, cfg, tok), counts=counts)
    core.fit(task, spec, ws)


def run(cfg: SFTConfig, ctx: StageContext) -> dict:
    """The ``sft`` stage: train, then write ``_SUCCESS`` with rows, steps, losses and timings."""
    return runner.run_job("sft", train_loop, cfg, ctx, runner.supervised("prompt_id"), runner.rows_report)
