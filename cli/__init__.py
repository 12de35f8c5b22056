"""The ``rlhf`` command line: ``app`` (validate, plan, run, deploy) and its sub-commands (models, pools,
reproduce, ui), the live terminal view and console tracebacks. Commands set the offline defaults and
the home before anything imports Prefect or MLflow; the work itself is in ``flows`` and ``registry``."""
