"""The speed work, installed into a model from outside: each function here computes the same numbers as a plain one
(in hyena.py, modal/, train.py or distill.py), faster, and its docstring names that twin and the CPU test that
holds the two equal. hyena.py never imports this package; a script that wants speed asks for it:

    fast.install(model)        # or an objective: every model inside it (a distillation's student and teacher)

swaps, in every module, each plain function held as an attribute for its twin (TWINS). The losses are arguments
of the training objectives, not attributes of a model: a script passes fast.losses' twins (train.lm_loss ->
fast.losses.lm_loss, distill.kd_loss -> fast.losses.kd_loss). `wanted` reads the scripts' --fast flag.

  fftconv.py  the FFT long convolution with a hand-written backward      twin of hyena.fftconv
  toeplitz.py the long convolution as block-Toeplitz products (Triton)   twin of hyena.fftconv
              up to TOEPLITZ_MAX_L positions, fftconv.py's beyond (long_conv)
  losses.py   the head's loss fused with its gradient, chunk by chunk     twins of train.lm_loss, distill.kd_loss
  mixer.py    the short convolution and gates fused around toeplitz.py  twin of hyena.mix
              (Triton), forward and backward, order 2
  decode.py   a Triton kernel for Hyena's decoding step; a Triton scan    twins of hyena.history_conv,
              for a modal prefill's state; a modal layer's step between      modal.fit.prefill_state,
              its projections in one kernel                                  hyena.mix_step
  step.py     a whole decoding step in ~3 kernels a block, replayed        twin of hyena.eager_step
              from a CUDA graph
  attention.py a teacher's decoding attention up to pos only (Triton)      twin of hyena.cached_attention
  draw.py     the draw of the next tokens in two kernels (Triton)         twin of hyena.sample
"""
import inspect

import hyena
from fast import attention, decode, draw, mixer, step, toeplitz
from modal import fit

TWINS = {  # plain function -> its fast twin, wherever a module holds it as an attribute
    hyena.fftconv: toeplitz.long_conv,          # HyenaOperator.long_conv (FFTConv where Toeplitz does not serve)
    hyena.mix: mixer.mix,                       # HyenaOperator.mix (the gates fused around the Toeplitz kernels)
    hyena.history_conv: decode.long_conv_step,  # HyenaFilter.history_conv (the decoding step's long convolution)
    fit.prefill_state: decode.prefill_state,    # ModalFilter.prefill_state (a modal prefill's recurrence state)
    hyena.eager_step: step.cuda_graph_step,     # GPTNeoX.make_step (generate's step: a CUDA graph's replay)
    hyena.mix_step: decode.mix_step,            # HyenaOperator.mix_step (a modal layer's step: one kernel)
    hyena.cached_attention: attention.cached_attention,  # Attention.cached_attention (decoding's attention)
    hyena.sample: draw.sample,                  # GPTNeoX.sample (generate's draw: two kernels)
}


def install(module, on=True):
    """Put the fast twins into every module of `module` (in place; returns it). on=False puts the plain functions
    back. Twins that need CUDA (or Triton) fall back to their plain function elsewhere, so any device is fine."""
    swap = TWINS if on else {twin: plain for plain, twin in TWINS.items()}
    for m in module.modules():
        for name, value in list(vars(m).items()):
            if inspect.isfunction(value) and value in swap:
                setattr(m, name, swap[value])
    return module


def wanted(choice, device):
    """The scripts' --fast: "on", "off", or "auto" (on for a CUDA device: there the twins pay; on the CPU the plain
    code runs, the code one reads)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--fast {choice!r}: choose auto, on or off")
    return choice == "on" or (choice == "auto" and str(device).startswith("cuda"))
