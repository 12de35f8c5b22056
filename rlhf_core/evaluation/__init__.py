"""Evaluation: the evaluate stage's work (``evaluate.py``), its metrics (``metrics.py``: held-out loss,
verified accuracy) and held-out evaluation of reward models (``reward_model.py``)."""
