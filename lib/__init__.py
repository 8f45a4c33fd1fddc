"""What the root's modules and scripts use beside the core, each read on its own.

The model's parts that hyena.py uses without spelling them out:
  attention        GPT-NeoX's attention with its rotary embeddings: the teacher's mixer
  implicit_filter  the Hyena operator's implicit long filter h(t) = FFN(PositionalEmbedding(t)) * Window(t)
  decoding         cached decoding: the Cache, and what each attention or Hyena layer keeps and how it steps
The scripts' and the training loop's:
  cli              the scripts' one error path, flag helpers, atomic writes, the progress line
  train_config     TrainConfig: the training loop's settings, which are every training script's --flags
  distill_plan     distill.py's settings beyond those (DistillConfig) and its stages in order
  checkpoint       resumable training checkpoints, and the pretrained weights GPTNeoX.from_pretrained reads
  runtime          the process a training run lives in: torchrun's ranks, glibc's allocator, Ctrl-C
  sources          the corpus readers behind prepare.py (local text and archives, hub parquet)
  sweep            eval.py's context sweep (the same tokens scored at several contexts)
"""
