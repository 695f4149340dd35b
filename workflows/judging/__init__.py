"""What the stages share about judging pairs of answers, below every stage package.

``pairwise`` (the (A)/(B) questions, soft labels, ids, pair selection: pure), ``batch``
(``judge_pairs``, one batch of pairs with any engine), ``config`` (the judging settings: the
``preference`` stage's config), ``workers`` (the judging actor pool and ``judge_gold``),
``label_cache`` (with ``label_keys`` and ``label_store``: the judgments store every actor shares),
``human`` (human preference data and the ``preferences`` schema), ``pairs``
(pairs read from a file), ``agreement`` (AI labels against human ones, routing to people) and
``gold`` (the gold gate's figures). The ``preference`` stage labels with them; the ``evaluate``
stage asks its judge the same questions and scores it on the same gold pairs."""
