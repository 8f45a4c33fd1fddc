"""What the root's modules and scripts use beside the core, each read on its own: the scripts' error path and
atomic writes (cli), resumable training checkpoints (checkpoint), the corpus readers behind prepare.py (sources),
and the Laughing Hyena modal fit behind hyena.to_modal (modal)."""
