"""rapt-reg: RAPT (multi-layer random perturbation training) as a drop-in loss term.

>>> import rapt_reg
>>> sorted(rapt_reg.__all__)[:3]
['BlockDiscoveryError', 'BlockStack', 'PerturbationRegularizer']
"""

from .baselines import R3FRegularizer, SmartRegularizer
from .discovery import BlockDiscoveryError, BlockStack, find_transformer_blocks
from .errors import RaptRegError
from .noise import sample_noise, scale_noise
from .regularizer import PerturbationRegularizer, RandomPerturbationRegularizer

__version__ = "0.3.0"

__all__ = [
    "BlockDiscoveryError",
    "BlockStack",
    "PerturbationRegularizer",
    "R3FRegularizer",
    "RandomPerturbationRegularizer",
    "RaptRegError",
    "SmartRegularizer",
    "__version__",
    "find_transformer_blocks",
    "sample_noise",
    "scale_noise",
]
