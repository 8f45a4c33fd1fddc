"""What eval.py uses beyond one perplexity pass.

  sweep.py  the context sweep: the same tokens scored at several contexts (eval.py --context C1 C2 ...)
"""
