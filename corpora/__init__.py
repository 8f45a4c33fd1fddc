"""The text prepare.py tokenizes.

  sources.py  local text (.txt, .jsonl, archives of them) and hub datasets (parquet), read document by document
"""
