"""Built-in verifiers: each scores a batch of completions against what its prompt rows carry."""
