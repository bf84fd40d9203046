"""Find the transformer blocks of any model by introspection.

A *stack* is an ``nn.ModuleList``, ``nn.Sequential`` or ``nn.ModuleDict`` whose members share
one class and contain attention; the outermost wins (not ALBERT's inner layer list, nor per-head
lists). Which of several stacks wins: :func:`find_block_stacks`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional, Union

from torch import nn

from .errors import RaptRegError

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)

BlocksSpec = Union[str, Sequence[Union[str, nn.Module]], None]


class BlockDiscoveryError(RaptRegError):
    """The transformer blocks could not be found, or more than one stack could be them."""


@dataclass(frozen=True)
class BlockStack:
    """The blocks noise can be added after, in the order they run.

    Attributes:
        path: Dotted path of the container in the (unwrapped) model (``""``: a list by hand).
        names: Dotted path of each block.
        blocks: The block modules; one may run several times a forward (ALBERT's layer, a loop).
        calls_per_forward: Block calls (= layers) the last noisy forward made, never from a config.
        batch_dim: The hidden states' example dimension: ``batch_first``'s, ``batch_dim=``, else
            the first noisy pass's (:func:`rapt_reg.hooks.infer_batch_dim`, or 0); None until then.
    """

    path: str
    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    calls_per_forward: Optional[int] = None
    batch_dim: Optional[int] = None

    def __len__(self) -> int:
        return len(self.blocks)

    def with_batch_dim(self, batch_dim: int) -> BlockStack:
        """This stack with ``batch_dim`` set by the user."""
        return replace(self, batch_dim=batch_dim)

    def with_calls(self, calls: int, batch_dim: int) -> BlockStack:
        """This stack as a forward showed it: its block calls, and its batch dim if unknown."""
        known = batch_dim if self.batch_dim is None else self.batch_dim
        return replace(self, calls_per_forward=calls, batch_dim=known)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel/FSDP/DeepSpeed, torch.compile and PEFT wrappers, outermost first."""
    inner = None
    by_name = type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine")
    if by_name or isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = getattr(model, "module", None)
    elif hasattr(model, "_orig_mod"):
        inner = model._orig_mod  # torch.compile's OptimizedModule
    elif type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        inner = model.get_base_model()  # type: ignore[operator]
    return unwrap_model(inner) if isinstance(inner, nn.Module) else model


def _has_attention(block: nn.Module) -> bool:
    """An ``nn.MultiheadAttention``, or attn/attention in a submodule's class or dotted name."""
    return any(
        isinstance(m, nn.MultiheadAttention) or _ATTENTION.search(f"{type(m).__name__} {name}")
        for name, m in block.named_modules()
    )


def _make_stack(path: str, members: list[tuple[str, nn.Module]]) -> BlockStack:
    """The stack of ``members``; its batch dim from the first block's first ``batch_first``."""
    flags = (getattr(m, "batch_first", None) for m in members[0][1].modules())
    batch_dim = next((0 if f else 1 for f in flags if isinstance(f, bool)), None)
    names = tuple(f"{path}.{n}" if path else n for n, _ in members)
    return BlockStack(path, names, tuple(m for _, m in members), batch_dim=batch_dim)


def multimodal_text_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The text decoder (``get_decoder()``) of a multimodal generative transformers model, else
    None: a model that can generate, with a text sub-config, neither config an encoder-decoder
    (LLaVA's ``model.language_model``, Idefics3's ``model.text_model``; not T5, BART, CLIP).
    Its logits at position ``t`` predict token ``t + 1``, as a causal LM's do."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    try:
        configs = (config, config.get_text_config(decoder=True))  # type: ignore[union-attr]
        decoder = model.get_decoder() if model.can_generate() else None  # type: ignore[operator]
    except (AttributeError, TypeError, ValueError):  # not transformers, or several text configs
        return None
    plain = configs[1] is config or any(getattr(c, "is_encoder_decoder", False) for c in configs)
    return None if plain or not isinstance(decoder, nn.Module) or decoder is model else decoder


def text_decoder_stack(model: nn.Module) -> Optional[BlockStack]:
    """The blocks of :func:`multimodal_text_decoder`: its outermost container whose members all
    contain attention (of one class or not: Mllama interleaves cross- and self-attention)."""
    model, decoder = unwrap_model(model), multimodal_text_decoder(model)
    path = next((n for n, m in model.named_modules() if m is decoder), None)
    for name, module in decoder.named_modules(prefix=path) if path is not None else ():  # type: ignore[union-attr]
        members = list(module.named_children()) if isinstance(module, _CONTAINERS) else []
        if members and all(_has_attention(m) for _, m in members):
            return _make_stack(name, members)
    return None


def find_block_stacks(model: nn.Module, *, prefer: Optional[str] = "auto") -> list[BlockStack]:
    """All candidate stacks, or those with ``prefer`` in a part of their path if any (``"auto"``:
    :func:`text_decoder_stack` alone if any, else ``"encoder"``, an encoder-decoder's); several:
    only a forward can tell which runs. Raises :class:`BlockDiscoveryError` if there are none."""
    model = unwrap_model(model)
    if prefer == "auto" and (decoder := text_decoder_stack(model)) is not None:
        return [decoder]
    prefer = "encoder" if prefer == "auto" else prefer
    seen: list[str] = []
    found: list[BlockStack] = []
    for path, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or len(module) == 0:
            continue
        members = list(module.named_children())
        kinds = ", ".join(sorted({type(m).__name__ for _, m in members}))
        seen.append(f"{path or '<root>'} ({type(module).__name__} of {len(members)}: {kinds})")
        nested = any(path.startswith(f"{outer.path}.") for outer in found)  # in a stack's member
        if len({type(m) for _, m in members}) == 1 and _has_attention(members[0][1]) and not nested:
            found.append(_make_stack(path, members))
    if not found:
        raise BlockDiscoveryError(
            f"no transformer blocks found in {type(model).__name__}: looked for a ModuleList, "
            "Sequential or ModuleDict of same-class modules containing attention among "
            f"{len(seen)} containers: {'; '.join(seen) or 'none'}. Pass blocks='dotted.path' "
            "(or a list of modules) to say which modules are the blocks."
        )
    return [s for s in found if prefer and any(prefer in p for p in s.path.split("."))] or found


def find_transformer_blocks(
    model: nn.Module, *, prefer: Optional[str] = "auto", blocks: BlocksSpec = None
) -> BlockStack:
    """The stack of transformer blocks of ``model``, in the order they run.

    Args:
        model: Any ``nn.Module``; DDP, FSDP, DeepSpeed, torch.compile, PEFT wrappers seen through.
        prefer: Part of a dotted path that wins among several stacks; ``"auto"``: a multimodal
            generative model's text decoder (LLaVA, PaliGemma, Qwen2-VL...), else an
            encoder-decoder's encoder (``prefer="encoder"`` on LLaVA is its vision tower).
        blocks: Override: a dotted path to the container (or one block), or modules or paths.

    Raises:
        BlockDiscoveryError: if nothing is found, or several stacks remain (listed; fix: blocks=).

    Example:
        >>> decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2), 3)
        >>> find_transformer_blocks(decoder).names
        ('layers.0', 'layers.1', 'layers.2')
    """
    if blocks is not None:
        return resolve_blocks(model, blocks)
    stacks = find_block_stacks(model, prefer=prefer)
    if len(stacks) > 1:
        raise ambiguity_error(stacks)
    return stacks[0]


def ambiguity_error(stacks: Sequence[BlockStack]) -> BlockDiscoveryError:
    listed = ", ".join(f"'{s.path}' ({len(s)} blocks)" for s in stacks)
    return BlockDiscoveryError(
        f"several stacks could be the transformer blocks: {listed}. Pass blocks='<path>' "
        "to choose one (or prefer='<part of the path>')."
    )


def resolve_blocks(model: nn.Module, blocks: BlocksSpec) -> BlockStack:
    """Turn a ``blocks=`` argument into a :class:`BlockStack` of ``model``'s own modules."""
    model = unwrap_model(model)
    if isinstance(blocks, nn.Module):
        raise BlockDiscoveryError(
            "blocks= got a single module: pass its dotted path, or a list of the block modules"
        )
    names = {id(m): n for n, m in model.named_modules()}
    members: list[tuple[str, nn.Module]] = []
    for item in [blocks] if isinstance(blocks, str) else blocks or ():
        if isinstance(item, str):
            try:
                members.append((item, model.get_submodule(item)))
            except AttributeError as exc:
                raise BlockDiscoveryError(
                    f"blocks={item!r} is not a submodule of {type(model).__name__}: {exc}"
                ) from None
        elif isinstance(item, nn.Module) and id(item) in names:
            members.append((names[id(item)], item))
        else:
            raise BlockDiscoveryError(
                f"blocks= entry {item!r} is not a submodule of {type(model).__name__}: pass "
                "modules of the model itself (or dotted paths)"
            )
    if not members:
        raise BlockDiscoveryError("blocks= is empty: pass a dotted path or a list of modules")
    if isinstance(blocks, str) and isinstance(target := members[0][1], _CONTAINERS):
        if len(target) == 0:
            raise BlockDiscoveryError(f"blocks={blocks!r} is an empty container")
        return _make_stack(blocks, list(target.named_children()))
    return _make_stack("", members)  # one block, or a list of them
