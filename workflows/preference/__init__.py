"""Stage ``preference`` (RL-CAI labels): reads ``prompts`` and a policy, samples K answers per
prompt into ``pairs``, has an AI judge answer (A)/(B) under sampled principles in both orders
(cached), mixes in human pairs by ratio, and writes TRL-loadable ``preferences`` plus a report.
Also here: judge/human agreement and routing uncertain pairs to people (``cai agreement|route``)."""
