"""MLflow: where runs are recorded and how models come back out of them.

- ``store``: the tracking store a command uses, and its client (the one place that decides);
- ``run``: ``Tracker``, one training run's params, metrics, tags, artifacts and final status;
- ``sweep``: the Hydra callback that nests a multirun's jobs under one parent run;
- ``compare``: the runs of an experiment or sweep side by side, and the best one's alias;
- ``pyfunc``: the logged model (an MLflow pyfunc built from code, safetensors weights);
- ``registry``: registering a logged model, and resolving any model URI to a local folder;
- ``sqlite_lookup``: the registry's fast path, a SQLite store's model locations read without MLflow.
"""
