"""The benchmarks: `python bench/bench.py` (speed, memory, fast paths vs references) and its report."""
