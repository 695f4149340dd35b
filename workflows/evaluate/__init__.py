"""Evaluation (DESIGN.md §6): did a run make the model more harmless without making it evasive?
So far its pure parts: statistics (Wilson, exact McNemar, bootstrap, length-controlled win rate),
the refusal classifier with its labeled set, the verdict rules, and the held-out prompt sets in
data/. The ``evaluate`` stage that answers those prompts with every model is not wired yet."""
