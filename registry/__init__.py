"""Everything MLflow: runs, metrics, artifacts, dataset inputs, the Model Registry and the stage cache.

This is the only package that imports mlflow.
"""
