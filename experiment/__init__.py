"""The paper's comparison: `python experiment/experiment.py` runs it, `python experiment/report.py` tabulates."""
