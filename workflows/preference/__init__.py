"""Stage ``preference`` (RL-CAI labels): reads ``prompts`` and a policy, samples K answers per
prompt into ``pairs``, has an AI judge answer (A)/(B) under sampled principles in both orders
(cached), mixes in human pairs by ratio, and writes TRL-loadable ``preferences`` plus a report.
Its commands (``cli``): ``cai label``, ``cai agreement`` and ``cai route`` (uncertain pairs to people). The
judging itself (questions, the actor pool, the label cache, the gold gate, agreement) is shared with
the ``evaluate`` stage and lives in ``workflows.judging``."""
