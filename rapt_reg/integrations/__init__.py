"""Helpers for training frameworks, imported only when asked for.

``import rapt_reg`` (and ``import rapt_reg.integrations``) needs torch alone; each name below
imports its framework on first access:

- :class:`~rapt_reg.integrations.transformers.RaptTrainer`,
  :class:`~rapt_reg.integrations.transformers.RaptTrainerMixin` and
  :func:`~rapt_reg.integrations.transformers.with_rapt`: the transformers ``Trainer``.
- :class:`~rapt_reg.integrations.lightning.RaptLightningMixin`: a Lightning ``LightningModule``
  (it imports nothing from Lightning).
- :func:`~rapt_reg.integrations.masks.token_mask`,
  :func:`~rapt_reg.integrations.masks.causal_token_mask` and
  :func:`~rapt_reg.integrations.masks.noise_inputs`: which positions of a batch count in the
  penalty and which get noise (torch alone).

PEFT, accelerate, DDP and ``torch.compile`` need no helper: their wrappers are seen through.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RaptTrainer": ("transformers", "transformers"),
    "RaptTrainerMixin": ("transformers", "transformers"),
    "with_rapt": ("transformers", "transformers"),
    "token_mask": ("masks", None),
    "causal_token_mask": ("masks", None),
    "noise_inputs": ("masks", None),
    "RaptLightningMixin": ("lightning", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, needs = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        if needs is None:
            raise
        raise ImportError(
            f"rapt_reg.integrations.{name} needs the {needs!r} package: "
            "pip install 'rapt-reg[integrations]'"
        ) from exc
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
