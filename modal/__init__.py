"""Laughing Hyena (Massaroli et al., NeurIPS 2023, arXiv 2310.18780): Hyena filters as sums of decaying complex
modes, decoded by a fixed-size recurrence at any length. An extra: hyena.py does not import it.

  fit.py      the numerics on tensors: the modal convention, the filter's response, the fit (ERA poles,
              least-squares residues), the recurrence's state after a prompt
  student.py  the model side: ModalFilter and its decoding state, modal students built, converted (to_modal)
              and loaded (load_pretrained, for any checkpoint a script may be given)
"""
