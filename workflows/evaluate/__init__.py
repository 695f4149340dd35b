"""Evaluation (DESIGN.md §6): did a run make the model more harmless without making it evasive?
Its pure parts so far: held-out prompt sets in data/ (eval_red_team, eval_benign_edgy,
eval_helpful; none overlapping the built-in training prompts), the refusal classifier and its
labeled set, overlap checks, statistics, and the verdict rules. The ``evaluate`` stage that
answers those prompts with every model and writes the report is not wired yet."""
