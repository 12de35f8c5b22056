"""Direct alignment (book ch.8): DPO and its family, against cached reference log-probs."""
