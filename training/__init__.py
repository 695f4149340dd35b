"""Training jobs on Ray Train + DeepSpeed (docs/training.md).

* ``sft``: supervised fine-tuning on the ``sft`` dataset, loss on assistant tokens only;
* ``reward``: a reward model (causal-LM backbone + scalar head, Bradley–Terry loss, soft labels);
* ``dpo``: direct preference optimisation against the frozen starting model;
* ``ppo``: PPO or RLOO of a policy against the reward model, rollouts from engine actors.

Each job module has one entry ``run(cfg, ctx) -> dict`` (the ``_SUCCESS`` info) and its Ray Train
loop. What they share: ``runner`` on the driver (read inputs, the TorchTrainer, ``summary.md`` and
``_SUCCESS``), ``worker`` what each worker is given (``JobSpec``: the typed config itself) and
derives (``WorkerSettings``: rank, device, precision), ``core`` the train loop and the export,
``checkpoints`` resuming; ``config`` holds the typed configs, ``data`` the pure tokenization,
``losses`` and ``rl`` the pure losses.
"""
