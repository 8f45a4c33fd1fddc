"""What eval.py uses beyond one perplexity pass's loop.

  windows.py  how a split is cut into what is scored: every token once (eval_windows), document by document as
              lm-evaluation-harness does (harness_windows), batches of them; the context sweep's windows
  sweep.py    the context sweep: the same tokens scored at several contexts (eval.py --context C1 C2 ...)
"""
