"""What the root's modules and scripts use beside the core (hyena.py, the model, uses none of it but for reading
and writing checkpoints), each read on its own:
  cli              the scripts' one error path, flag helpers, atomic writes, one writer per folder, a full
                   disk named, the progress line
  train_config     TrainConfig: the training loop's settings, which are every training script's --flags
  distill_plan     distill.py's settings beyond those (DistillConfig) and its stages in order
  checkpoint       resumable training checkpoints, and the pretrained weights GPTNeoX.from_pretrained reads
  runtime          the process a training run lives in: torchrun's ranks, glibc's allocator, Ctrl-C
  safetensors_io   safetensors read and write by hand (nothing read is ever unpickled)
  sources          the corpus readers behind prepare.py (local text and archives, hub parquet)
  sweep            eval.py's context sweep (the same tokens scored at several contexts)
"""
