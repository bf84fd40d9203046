"""SMART and R3F, the regularizers RAPT is compared with, under RAPT's call shape.

Both take ``reg(noisy_forward, clean_output, mask=None)`` and ``reg.pair(forward)`` like
:class:`~rapt_reg.RandomPerturbationRegularizer`, and add their noise through the same hooks
on the blocks and the same checkpoint replay: at layer 0, the embedding output entering the
first block call. They are not part of the core: each says only what noise goes there.

- :class:`SmartRegularizer` follows MT-DNN's ``SmartPerturbation`` (the code the SMART and
  RAPT papers were run with): ``k`` projected ascent steps, then a symmetric KL between the
  adversarial and the clean outputs.
- :class:`R3FRegularizer` follows fairseq's ``sentence_prediction_r3f`` criterion (uniform or
  normal noise, a symmetric KL with gradients on both sides), with its noise on the embedding
  output rather than on detached token embeddings.
"""

from .r3f import R3F_NOISE, R3FRegularizer
from .smart import SMART_NORMS, SmartRegularizer

__all__ = ["R3F_NOISE", "R3FRegularizer", "SMART_NORMS", "SmartRegularizer"]
