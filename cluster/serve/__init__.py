"""OpenAI-compatible serving on Ray Serve: ``cai serve``, the ``serve`` stage, and ``serve run`` configs."""
