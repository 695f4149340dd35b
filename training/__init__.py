"""Training jobs on Ray Train + DeepSpeed (docs/training.md).

* ``sft``: supervised fine-tuning on the ``sft`` dataset, loss on assistant tokens only;
* ``reward``: a reward model (causal-LM backbone + scalar head, Bradley–Terry loss, soft labels);
* ``dpo``: direct preference optimisation against the frozen starting model.

Each job module has one entry ``run(cfg, ctx) -> dict`` (the ``_SUCCESS`` info) and its Ray Train
loop; ``core`` holds the machinery they share (TorchTrainer, DeepSpeed, checkpoints, export),
``config`` the typed configs, ``data`` the pure tokenization, ``losses`` the pure losses.
"""
