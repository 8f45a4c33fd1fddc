"""What the root's modules and scripts use beside the core, each read on its own:
  cli         the scripts' one error path, flag helpers, atomic writes, the progress line
  checkpoint  resumable training checkpoints, and the pretrained weights GPTNeoX.from_pretrained reads
  runtime     the process a training run lives in: torchrun's ranks, glibc's allocator, Ctrl-C
  sources     the corpus readers behind prepare.py (local text and archives, hub parquet)
  sweep       eval.py's context sweep (the same tokens scored at several contexts)
  modal       the Laughing Hyena modal fit behind modal_student.to_modal (and the modal filter's response)
"""
