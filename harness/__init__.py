"""lm-evaluation-harness support: the model adapter (adapter.py), the offline tasks (tasks/*.yaml) and their
data (build.py, run as `python prepare.py harness`). lm-eval is optional; nothing outside this folder imports it."""
