"""Stage ``prompts``: reads user prompts (jsonl/json/csv/parquet, a saved HF dataset, hf:NAME,
builtin:...) and writes the ``prompts`` dataset (prompt_id, messages, source); unreadable
records and duplicate prompts go to ``errors`` with their file and line."""
