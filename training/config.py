"""Typed configs of the training jobs (docs/training.md), validated by ``workflows.core.typed.from_dict``.

``TrainConfig`` holds what every job shares (model, DeepSpeed/ZeRO, optimisation, data,
checkpoints, Ray resources); ``SFTConfig``, ``RewardConfig``, ``DPOConfig``, ``PPOConfig`` and
``GRPOConfig`` add their own fields. What a worker derives from them (precision, DeepSpeed's config, the lr
schedule) is in ``training.worker``. In a recipe they are flat stage entries::

    - stage: dpo
      model: sft_model          # an earlier stage's model, a directory, a .gguf, or `embedded`
      input: preferences        # an earlier stage's dataset, or a parquet directory
      zero_stage: 2
      num_workers: 2
      beta: 0.1
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from actors.config import EngineConfig
from workflows.core.constitution import load_constitution
from workflows.core.errors import ConfigError
from workflows.core.rules import RuleSettings
from workflows.core.safety import check_name, check_recipe_code
from workflows.core.typed import check_fields


@dataclass
class LoraSettings:
    """Low-rank adapters (peft) instead of full fine-tuning; merged into the exported model."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r", f"got {self.r}", "use a rank of 1 or more (8–64 is usual)")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha", f"got {self.alpha}", "use a positive scale, e.g. 2 × r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout", f"got {self.dropout}", "use a value in [0, 1)")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules", "is empty", "list module names, e.g. [q_proj, v_proj]")


@dataclass
class TrainConfig:
    """What every training job shares. ``model``/``input`` may name an earlier stage's output."""

    model: str = "embedded"  # `embedded`, a save_pretrained directory, a .gguf, or an earlier stage's model
    input: str = "sft"  # dataset of an earlier stage, or a parquet directory
    output: str = "model"  # name of the exported Hugging Face directory inside the stage directory
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0–3
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU and on CPUs with native bf16, else fp32
    micro_batch_size: int = 4  # sequences (pairs for reward/DPO) per worker per forward pass
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 1024  # tokens per sequence; rows whose answer would be cut off entirely are dropped
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps
    seed: int | None = None  # default: the recipe's seed
    eval_fraction: float = 0.05  # held-out rows (chosen by a hash of the row id)
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    group_by_length: bool = True  # sort within windows of batches by length to cut padding
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100  # steps between checkpoints; 0: none before the end
    keep_checkpoints: int = 2
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2  # restarts from the last checkpoint after a worker fails (-1: unlimited)
    collective_timeout_s: int = 1800  # how long a worker waits in a collective (ppo: rank 0 rolls out meanwhile)
    lora: LoraSettings | None = None
    # Fault injection, for tests of resuming only: rank 0 raises once when it reaches this step
    # (a `_fault_injected` marker in the stage directory makes it once per stage directory).
    fail_at_step: int | None = None

    def validate(self, where: str) -> None:
        def bad(name: str, fix: str) -> ConfigError:
            return ConfigError(f"{where}.{name}", f"got {getattr(self, name)!r}", fix)

        if not self.model.strip():
            raise bad("model", "use `embedded`, a model directory, a .gguf file or an earlier stage's model")
        if not self.input.strip():
            raise bad("input", "name an earlier stage's dataset or a parquet directory")
        check_name(self.output, f"{where}.output", "output")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", "use 0 (plain data parallel), 1, 2 or 3")
        for name in ("micro_batch_size", "grad_accum", "epochs", "num_workers", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise bad(name, "use 1 or more")
        if self.lr <= 0:
            raise bad("lr", "use a positive learning rate, e.g. 1e-5")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "checkpoint_every",
                     "gpus_per_worker"):
            if getattr(self, name) < 0:
                raise bad(name, "use 0 or more")
        if self.max_length < 16:
            raise bad("max_length", "use at least 16 tokens (a prompt and an answer must fit)")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "use 1 or more, or leave it out for full epochs")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise bad("eval_fraction", "use a fraction in [0, 1), e.g. 0.05")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", "use a positive number (fractions are fine)")
        if self.collective_timeout_s < 60:
            raise bad("collective_timeout_s", "use 60 seconds or more (default 1800)")
        if self.max_failures < -1:
            raise bad("max_failures", "use -1 (unlimited), 0 (no restarts) or more")
        if self.fail_at_step is not None and self.fail_at_step < 1:
            raise bad("fail_at_step", "leave it out (it is a fault-injection knob for tests) or use 1 or more")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the ``sft`` dataset: loss on assistant tokens only."""

    input: str = "sft"
    output: str = "sft_model"
    lr: float = 2e-5


@dataclass
class RewardConfig(TrainConfig):
    """A reward (preference) model: backbone + scalar head, Bradley–Terry loss."""

    input: str = "preferences"
    output: str = "reward_model"
    lr: float = 1e-5
    margin: float = 0.0  # subtracted from r_chosen - r_rejected inside the loss
    use_soft_labels: bool = True  # train on p_chosen (soft BCE) instead of hard 1/0 labels
    normalize: bool = True  # `score` returns (r - mean) / std over the training set's rewards

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.margin < 0:
            raise ConfigError(f"{where}.margin", f"got {self.margin}", "use 0 (no margin) or a positive margin")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation against the frozen starting model."""

    input: str = "preferences"
    output: str = "dpo_model"
    lr: float = 5e-7
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO; ignored for rows with soft labels when use_soft_labels
    use_soft_labels: bool = False  # use p_chosen as the per-pair label (cDPO/soft IPO)
    reference: Literal["precompute", "model"] = "precompute"  # logprobs once up front, or a frozen copy
    rpo_alpha: float = 0.0  # > 0: + rpo_alpha × the chosen answer's NLL per token (RPO; TRL's rpo_alpha)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rpo_alpha < 0:
            raise ConfigError(f"{where}.rpo_alpha", f"got {self.rpo_alpha}", "use 0 (plain DPO) or more, e.g. 1.0")
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta", f"got {self.beta}", "use a positive beta, e.g. 0.1")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing", f"got {self.label_smoothing}", "use a value in [0, 0.5)")


@dataclass
class JudgeSettings:
    """``reward: judge`` (ppo, grpo) and ``labeler: judge`` (online_dpo): the constitution's judge
    compares each prompt's answers with each other — every pair, both orders, ``principles``
    principles drawn per pair — and an answer scores its mean chance of being preferred
    (``training.judging``). ``engine`` is the judge model (the embedded model unless named: a model
    directory, a vLLM engine or an OpenAI-compatible endpoint), served by ``engine.concurrency``
    actors beside the rollout actors. ``against: reference`` compares each answer with a reference
    answer instead — the prompt's own answer in the input (an SFT dataset's last assistant turn), else
    the starting policy's greedy answer, made once before the first update — so an answer's score is
    its chance of beating that fixed answer (PPO with one sample per prompt can use it); ``against:
    none`` judges each answer on its own (pointwise: its chance of meeting the principle's standard,
    both orders of the two verdicts), which needs no second answer either.
    ``gold``: before the job starts, the judge labels these
    human-labeled pairs with its engine, constitution and principles, pairwise in both orders (the
    preference stage's gold gate; gold data are pairs, whatever ``against`` says) and the stage
    stops — or warns — below ``min_agreement`` or above ``max_position_bias``."""

    constitution: str = "default"  # a shipped constitution's name or a YAML file
    principles: int = 1  # principles drawn per compared pair (their verdicts are averaged)
    against: Literal["each_other", "reference", "none"] = "each_other"  # what each answer is compared with
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(model="embedded", concurrency=1))
    engine_factory: str | None = None  # "module:callable" building the judge engine (tests)
    gold: str | None = None  # human-labeled pairs (a file, or builtin:gold_pairs) the judge must agree with first
    min_agreement: float = 0.6  # share of gold pairs where the judge picks the human's answer
    max_position_bias: float | None = 0.4  # share of gold pairs whose two orders disagree (null: no limit)
    on_gold_fail: Literal["stop", "warn"] = "stop"

    def validate(self, where: str) -> None:
        bias = self.max_position_bias
        check_fields(self, where, [("principles", self.principles < 1, "use 1 or more"),
                                   ("engine.concurrency", self.engine.concurrency < 1, "use 1 or more judge actors"),
                                   ("min_agreement", not 0.0 <= self.min_agreement <= 1.0, "use a share in [0, 1]"),
                                   ("max_position_bias", bias is not None and not 0.0 <= bias <= 1.0,
                                    "use a share in [0, 1], or null for no limit")])
        check_recipe_code(self.engine_factory, where, "engine_factory")
        try:
            load_constitution(self.constitution)
        except ConfigError as e:
            raise ConfigError(f"{where}.constitution", str(e)) from None


@dataclass
class PPOConfig(TrainConfig):
    """RL against the preference model: PPO (clipped policy and value losses, GAE, a value head
    on the policy initialized from the reward head) or RLOO (critic-free, leave-one-out baseline
    over the ``samples_per_prompt`` samples of a prompt). Rollouts come from engine actors that
    load the new weights after every update. ``micro_batch_size`` sequences per forward pass."""

    model: str = "sft_model"
    input: str = "prompts"
    output: str = "ppo_model"
    reward_model: str = "reward_model"  # an earlier stage's reward model or its directory
    reward: Literal["reward_model", "rules", "judge"] = "reward_model"  # what scores a rollout (docs/training.md)
    rules: RuleSettings = field(default_factory=RuleSettings)  # reward: rules — the sources to refuse
    judge: JudgeSettings = field(default_factory=JudgeSettings)  # reward: judge — the judge and its constitution
    reward_fn: str | None = None  # "module:callable" (messages, response text, token ids) → float, instead
    algorithm: Literal["ppo", "rloo"] = "ppo"
    iterations: int = 20  # rollout → update rounds
    prompts_per_iteration: int = 8  # split evenly over the workers
    samples_per_prompt: int = 2  # n (RLOO needs ≥ 2)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0  # must stay 1.0 (see validate); kept so the setting is explicit
    ppo_epochs: int = 2  # passes over each batch of rollouts
    lr: float = 1e-6
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β of the per-token KL penalty to the starting policy
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = None  # adaptive β (per-sequence KL the controller steers to); null: fixed
    kl_horizon: int = 10_000  # in sequences: β moves by at most 20% × rollouts / horizon per iteration
    end_penalty: float = 1.0  # subtracted from the score of a response that never ended
    whiten_advantages: bool = True
    critic_warmup: int = 0  # first iterations train the value head only (PPO)
    rollout: EngineConfig = field(default_factory=lambda: EngineConfig(concurrency=1))  # its model: the policy
    sync_bucket_mb: float = 256  # weights travel to the rollout actors in object-store pieces of at most this
    checkpoint_every: int = 5  # iterations between checkpoints
    eval_fraction: float = 0.0
    collective_timeout_s: int = 7200  # the other workers wait in a broadcast while rank 0 rolls out
    # GRPO's settings (fields of GRPOConfig); PPO and RLOO put the KL in the reward and average the
    # loss over the minibatch's tokens
    kl_in = "reward"
    loss_norm = "token"
    scale_rewards = "none"

    def validate(self, where: str) -> None:
        super().validate(where)
        checks = [
            ("iterations", self.iterations < 1, "use 1 or more"),
            ("prompts_per_iteration", self.prompts_per_iteration < self.num_workers
             or self.prompts_per_iteration % self.num_workers, f"use a multiple of num_workers ({self.num_workers})"),
            ("samples_per_prompt", self.samples_per_prompt < (1 if self.algorithm == "ppo" else 2),
             f"use 2 or more for {self.algorithm} (its baseline is the other samples of the prompt), "
             "1 or more for ppo"),
            ("max_new_tokens", self.max_new_tokens < 1, "use 1 or more"),
            ("temperature", self.temperature <= 0, "sample with temperature > 0 (RL needs exploration), e.g. 1.0"),
            ("ppo_epochs", self.ppo_epochs < 1, "use 1 or more"),
            ("kl_coef", self.kl_coef < 0, "use 0 or more, e.g. 0.05"),
            ("kl_target", self.kl_target is not None and self.kl_target <= 0, "use a positive KL, or null"),
            ("sync_bucket_mb", self.sync_bucket_mb <= 0, "use a positive size in MB, e.g. 256"),
            ("grad_accum", self.grad_accum != 1,
             "use 1: ppo steps the optimizer once per minibatch of micro_batch_size sequences (raise that instead)"),
            ("top_p", self.top_p != 1.0, "use 1.0: the trainer's log-probs are of the full distribution, so "
             "nucleus sampling would bias every importance ratio"),
            ("critic_warmup", self.critic_warmup < 0 or self.critic_warmup >= self.iterations,
             "use 0 or more, below iterations"),
            ("rollout.backend", self.rollout.backend == "openai",
             "an OpenAI-compatible endpoint cannot load new weights: roll out with transformers or vllm"),
            ("reward_fn", self.reward in ("rules", "judge") and self.reward_fn is not None,
             f"remove reward_fn, or reward: {self.reward} — one of them scores the rollouts"),
            ("samples_per_prompt", self.reward == "judge" and self.judge.against == "each_other"
             and self.samples_per_prompt < 2,
             "use 2 or more with reward: judge (the judge compares a prompt's answers with each other), "
             "or judge.against: reference or none (each answer judged on its own)"),
        ]
        check_fields(self, where, checks)
        check_recipe_code(self.reward_fn, where, "reward_fn")


# PPO settings GRPO has no use for (no critic, its own advantage scaling): set away from their
# defaults in a grpo stage they are refused, not silently ignored
_CRITIC_FIELDS = ("vf_coef", "value_clip_eps", "gamma", "lam", "critic_warmup", "whiten_advantages")


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO (Shao et al. 2024): ``samples_per_prompt`` answers per prompt, each answer's advantage
    its reward against its group's mean (``scale_rewards``: divided by the group's standard
    deviation, the batch's, or not at all), the clipped policy loss, no critic. ``kl_in: loss`` adds
    β × the k3 KL to the reference per token to the loss (the paper's), ``reward`` folds it into
    each answer's reward as RLOO does. ``loss_norm``: ``sequence`` (the paper's per-answer mean),
    ``token`` (DAPO) or ``constant`` (Dr. GRPO; with ``scale_rewards: none`` it is Dr. GRPO).
    Rollout actors, weight sync, versions, checkpoints and the summary are PPO's."""

    output: str = "grpo_model"
    algorithm: Literal["grpo"] = "grpo"
    samples_per_prompt: int = 4
    ppo_epochs: int = 1  # one pass: the ratio starts at 1 and clipping guards a second
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    loss_norm: Literal["sequence", "token", "constant"] = "sequence"
    scale_rewards: Literal["group", "batch", "none"] = "group"

    def validate(self, where: str) -> None:
        super().validate(where)
        defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
        check_fields(self, where, [(name, getattr(self, name) != defaults[name],
                                    "remove it: grpo has no critic and scales its advantages by scale_rewards")
                                   for name in _CRITIC_FIELDS])
        check_fields(self, where, [("kl_estimator", self.kl_in == "loss" and self.kl_estimator != "k3",
                                    "use k3 with kl_in: loss (k1's gradient is that of log p alone, zero in "
                                    "expectation: it would not pull the policy toward the reference)")])


@dataclass
class OnlineDPOConfig(TrainConfig):
    """Online (iterative) DPO: each round the current policy answers ``prompts_per_round`` prompts
    ``samples_per_prompt`` times through the rollout engine actors, the ``labeler`` scores the
    answers — ``rules`` (the prompt's category and the refusal classifier), ``reward_model`` (the
    reward stage's model, or ``reward_fn``) — and each prompt's best answer is chosen over its
    worst (a prompt whose answers all tie makes no pair); DPO against the starting model trains on
    the round's pairs (``dpo_epochs`` passes), the new weights go to the actors, and the next round
    samples from them. ``on_tie: reference``: a prompt whose answers all tie is paired with its
    reference answer (the input's own answer, else the starting policy's greedy answer, made once
    before the first update) as chosen over one of them, where the labeler scores the reference
    higher — so a prompt the policy has stopped getting right still teaches (rules: a red-team
    request every answer complies with, a benign one every answer refuses). Every round's pairs are
    a dataset (``pairs/round-NNNN.parquet``, TRL columns); a checkpoint after every
    ``checkpoint_every`` rounds."""

    model: str = "sft_model"
    input: str = "prompts"
    output: str = "online_dpo_model"
    labeler: Literal["rules", "reward_model", "judge"] = "rules"
    rules: RuleSettings = field(default_factory=RuleSettings)  # labeler: rules — the sources to refuse
    judge: JudgeSettings = field(default_factory=JudgeSettings)  # labeler: judge — the judge and its constitution
    reward_model: str = "reward_model"  # labeler: reward_model — an earlier stage's reward model or its directory
    reward_fn: str | None = None  # labeler: reward_model — "module:callable" instead of the reward model
    rounds: int = 4
    prompts_per_round: int = 16  # split evenly over the workers
    samples_per_prompt: int = 4  # answers per prompt; its best and worst make the pair
    on_tie: Literal["skip", "reference"] = "skip"  # answers all tie: no pair, or the reference over one if it scores higher
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    end_penalty: float = 0.0  # subtracted from the score of an answer that never ended
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    dpo_epochs: int = 1  # passes over each round's pairs
    rpo_alpha: float = 0.0  # > 0: + rpo_alpha × the chosen answer's NLL per token (RPO; TRL's rpo_alpha)
    lr: float = 5e-7
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    rollout: EngineConfig = field(default_factory=lambda: EngineConfig(concurrency=1))  # its model: the policy
    sync_bucket_mb: float = 256
    checkpoint_every: int = 1  # rounds between checkpoints
    eval_fraction: float = 0.0
    collective_timeout_s: int = 7200

    # the names the rollout code shared with ppo reads
    @property
    def reward(self) -> str:
        return self.labeler

    @property
    def prompts_per_iteration(self) -> int:
        return self.prompts_per_round

    def validate(self, where: str) -> None:
        super().validate(where)
        check_fields(self, where, [
            ("rounds", self.rounds < 1, "use 1 or more"),
            ("prompts_per_round", self.prompts_per_round < self.num_workers
             or self.prompts_per_round % self.num_workers, f"use a multiple of num_workers ({self.num_workers})"),
            ("samples_per_prompt", self.samples_per_prompt < 2, "use 2 or more: a pair needs two answers"),
            ("max_new_tokens", self.max_new_tokens < 1, "use 1 or more"),
            ("temperature", self.temperature <= 0, "sample with temperature > 0, e.g. 1.0: the answers must differ"),
            ("beta", self.beta <= 0, "use a positive beta, e.g. 0.1"),
            ("rpo_alpha", self.rpo_alpha < 0, "use 0 (plain DPO) or more, e.g. 1.0"),
            ("dpo_epochs", self.dpo_epochs < 1, "use 1 or more"),
            ("on_tie", self.on_tie == "reference" and self.labeler == "judge",
             "use skip with labeler: judge (it scores answers against each other, not the reference on its own)"),
            ("sync_bucket_mb", self.sync_bucket_mb <= 0, "use a positive size in MB, e.g. 256"),
            ("grad_accum", self.grad_accum != 1, "use 1: raise micro_batch_size (pairs per step) instead"),
            ("rollout.backend", self.rollout.backend == "openai",
             "an OpenAI-compatible endpoint cannot load new weights: roll out with transformers or vllm"),
            ("reward_fn", self.labeler == "rules" and self.reward_fn is not None,
             "remove reward_fn, or use labeler: reward_model — the rules label without it"),
        ])
        check_recipe_code(self.reward_fn, where, "reward_fn")
