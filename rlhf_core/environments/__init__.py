"""Multi-turn environments: tool use and function calling, verifier feedback, users' own (book ch.13)."""
