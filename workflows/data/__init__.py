"""Shipped prompt sets, read with ``prompts.path: builtin:NAME``.

- ``red_team.jsonl``: requests a harmless assistant should decline or redirect
  (dangerous instructions, harassment, scams, privacy invasion, self-harm-adjacent,
  bias bait, illegal activity, manipulation). Each line: ``{"prompt", "category"}``.
  The prompts ask for harm; none contains harmful details itself.
- ``helpful.jsonl``: ordinary everyday requests, so a run also measures helpfulness.
"""
