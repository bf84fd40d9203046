"""What a batch says about its positions: which count in the penalty, which get noise.

Torch alone (no framework import), shared by the transformers and Lightning helpers. The keys
read are transformers' conventions: ``labels`` (-100 where ignored), ``attention_mask`` (1 on
real tokens), ``position_ids`` (restarting at 0 for each example packed into a row, as
``DataCollatorWithFlattening`` and TRL's padding-free packing make them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

IGNORE_INDEX = -100


def _token_labels(inputs: Mapping[str, Any], key: str = "labels") -> Optional[torch.Tensor]:
    labels = inputs.get(key)
    if isinstance(labels, torch.Tensor) and labels.ndim >= 2 and not labels.is_floating_point():
        return labels
    return None


def token_mask(inputs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """Positions of a token-level output that count in the penalty: ``labels != -100``.

    For outputs judged at their own position: masked LM, token classification, and seq2seq
    (whose logits ``[t]`` are judged by ``labels[t]``; the decoder inputs are shifted
    instead). Sequence-level labels (``[batch]``, or float multi-label ``[batch, classes]``)
    and batches without labels need no mask. For causal LMs use :func:`causal_token_mask`.

    Args:
        inputs: The batch (a mapping with ``labels``).

    Returns:
        A boolean ``[batch, seq]`` mask, or None.
    """
    labels = _token_labels(inputs)
    return None if labels is None else labels != IGNORE_INDEX


def causal_token_mask(inputs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """Positions of a causal LM's logits that count in the penalty, following the shift.

    ``logits[t]`` predicts token ``t + 1`` and is judged by ``labels[t + 1]``, so position
    ``t`` counts where ``labels[t + 1] != -100``; the last position predicts nothing and never
    counts. Pre-shifted ``shift_labels`` (as under context parallelism) are used as they are.

    Args:
        inputs: The batch (a mapping with ``labels`` or ``shift_labels``).

    Returns:
        A boolean ``[batch, seq]`` mask, or None for a batch without token-level labels.
    """
    shifted = _token_labels(inputs, "shift_labels")
    if shifted is not None:
        return shifted != IGNORE_INDEX
    labels = _token_labels(inputs)
    if labels is None:
        return None
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask


def noise_inputs(inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``noise_mask`` and ``segment_ids`` for the regularizer, from the batch alone.

    - ``noise_mask``: ``attention_mask.bool()`` when the batch has a 2-D ``attention_mask``,
      so padding gets no noise and each example is scaled over its real tokens.
    - ``segment_ids``: when the batch has 2-D integer ``position_ids``, a new segment starts
      wherever they restart at 0, so every example packed into a row is scaled as one.

    Args:
        inputs: The batch.

    Returns:
        A dict with those of the two keys the batch allows (possibly empty), to pass as
        ``reg.pair(forward, **noise_inputs(batch))``.

    Example:
        >>> noise_inputs({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
        {'segment_ids': tensor([[1, 1, 1, 2, 2]])}
    """
    found: dict[str, torch.Tensor] = {}
    attention_mask = inputs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        found["noise_mask"] = attention_mask.bool()
    position_ids = inputs.get("position_ids")
    if (
        isinstance(position_ids, torch.Tensor)
        and position_ids.ndim == 2
        and not position_ids.is_floating_point()
    ):
        found["segment_ids"] = (position_ids == 0).cumsum(-1)
    return found
