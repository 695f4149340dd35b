"""Stage ``critique_revision`` (SL-CAI): reads ``prompts``, answers each with the helpful model,
then runs N rounds of critique → revision under sampled constitution principles; writes
``sl_cai`` (the whole exchange) and ``sft`` (TRL conversational rows ending in the revision)."""
