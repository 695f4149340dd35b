"""Row ids: content hashes of at least 96 bits.

Prompt and pair ids are the first ``ID_HEX`` hex digits of a sha256 (96 bits): at a billion rows
the chance that any two share an id is about 6·10⁻¹² (birthday bound n²/2^97), where 64-bit ids —
what earlier versions wrote — collide with a 3 % chance. Judgment ids (label cache keys) are
whole sha256 digests.

Old run directories keep working: a stage's ids come from its input data, never recomputed from
the text once written, so a finished stage with 16-digit ids feeds later stages as it is, and a
half-done stage resumes with new rows getting 24-digit ids beside the old ones (docs/scale.md,
"Upgrading a run directory").
"""
ID_HEX = 24
