"""The speed work, apart from the readable model: each function here computes the same numbers as a plain one in
hyena.py (or lib/, distill.py), faster, and its docstring names that twin and the CPU test that holds the two equal.

  fftconv.py  the FFT long convolution with a hand-written backward      twin: hyena.fftconv
  losses.py   the head's loss fused with its gradient, chunk by chunk     twins: GPTNeoX.forward's F.cross_entropy,
                                                                                 distill.kd_loss's plain branch
  decode.py   a Triton kernel for Hyena's decoding step; CUDA graphs;     twins: HyenaState.long_conv's formula,
              a Triton scan for a modal prefill's state                          generate's eager step,
                                                                                 modal.fit.prefill_state

One switch chooses: `fast.enable(on)`. on=True runs the fast paths on every device, False nowhere, None (the
default) on CUDA tensors only; `active(t)` is how the model asks. train.py's loop turns them on for its run unless
they were switched off (on the CPU too: the fused loss keeps a step's memory on glibc's heap).
"""
ON = None  # the setting enable() made: None (the default: fast on CUDA only), True or False


def enable(on=True):
    """Switch the fast paths in (True), out (False) or back to the default (None: on CUDA only), for the whole
    process. Returns the previous setting, so a caller can put it back."""
    global ON
    previous, ON = ON, on
    return previous


def active(t):
    """Whether the fast paths serve tensor t: the one place the switch is read."""
    return t.is_cuda if ON is None else bool(ON)
