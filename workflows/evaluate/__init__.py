"""Evaluation (docs/evaluation.md): did a run make the model more harmless without making it evasive?

The ``evaluate`` stage (``stage.py``, ``cai eval``) answers held-out prompt sets (``data/``, read by
``eval_prompts``) with
every model, scores the answers (``refusal``, ``judge``, ``model_scores``), compares each model
with the base (``scoring``, with ``workflows.stats``), decides a verdict (``verdict``) and writes the report
(``report``). ``guard`` keeps eval prompts out of a recipe's training data (``overlap``)."""
