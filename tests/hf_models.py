"""Tiny, randomly initialised models of every architecture the compatibility tests cover.

Each :class:`ModelCase` builds its model from a config (no download; set ``HF_HUB_OFFLINE=1``)
and makes a matching batch: ``model(**case.batch())`` runs it, and
:func:`logits` reads the output. transformers models are built only when a test asks for
them, so importing this module needs torch alone.

Example:
    >>> case = CASES["index_loop"]
    >>> model = case.build()
    >>> logits(model(**case.batch())).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from models import Block, IndexLoopModel, TimmShapedViT
from torch import nn

HIDDEN = 32
HEADS = 2
DEPTH = 3
BATCH = 4
SEQ = 8
VOCAB = 64
CLASSES = 3


@dataclass(frozen=True)
class ModelCase:
    """How to build one architecture and feed it.

    Attributes:
        name: Test id.
        make: ``make(dropout) -> model`` (weights drawn from the global RNG).
        batch: ``batch() -> kwargs`` for ``model(**kwargs)``; deterministic.
        depth: Block calls per forward (the configured number of layers).
        modules: Distinct block modules (ALBERT: 1 shared layer run ``depth`` times).
        paths: Dotted path(s) of the stack discovery must find (transformers moved some).
        library: ``"transformers"`` or ``"torch"``.
        vision: A vision-language model's vision tower stack(s) (``paths`` is its text
            decoder's).
    """

    name: str
    make: Callable[[float], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor]]
    depth: int
    modules: int
    paths: tuple[str, ...]
    library: str = "transformers"
    vision: tuple[str, ...] = ()

    def build(self, dropout: float = 0.0, seed: int = 0) -> nn.Module:
        """The model in training mode, its weights drawn with ``seed``."""
        torch.manual_seed(seed)
        return self.make(dropout).train()


def logits(output: Any) -> torch.Tensor:
    """The logits of a model output (a tensor or an object with ``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def task_loss(output: Any) -> torch.Tensor:
    """Cross-entropy of any output (pooled or per token) against fixed labels ``i % classes``.

    A stand-in for the user's task loss that keeps the predictions from collapsing, so that
    the penalty stays meaningful over many steps.
    """
    flat = logits(output).float().flatten(0, -2)
    return F.cross_entropy(flat, torch.arange(len(flat), device=flat.device) % flat.shape[-1])


def _ids(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)


def _padded_mask(seq: int = SEQ) -> torch.Tensor:
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0  # one padded example, so masks are exercised
    return mask


def _text_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "attention_mask": _padded_mask()}


def _causal_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids()}


def _seq2seq_batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": _ids(),
        "attention_mask": _padded_mask(),
        "decoder_input_ids": _ids(seed=2)[:, : SEQ // 2],
    }


def _image_batch(key: str) -> Callable[[], dict[str, torch.Tensor]]:
    def batch() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        return {key: torch.randn(BATCH, 3, 16, 16, generator=gen)}

    return batch


def _hf(
    config_name: str,
    model_name: str,
    dropout_keys: tuple[str, ...],
    **config: Any,
) -> Callable[[float], nn.Module]:
    def make(dropout: float) -> nn.Module:
        import transformers

        settings = {key: dropout for key in dropout_keys}
        cfg = getattr(transformers, config_name)(**config, **settings)
        return getattr(transformers, model_name)(cfg)

    return make


_BERT_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    intermediate_size=2 * HIDDEN,
    max_position_embeddings=32,
    num_labels=CLASSES,
)
_BERT_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob")


class TorchEncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` with its defaults: nested tensors and the fused fast path on.

    ``batch_first=True`` lets eval-mode inference with a padding mask take the nested-tensor
    fast path; ``batch_first=False`` makes the blocks' batch dimension 1.
    """

    def __init__(self, dropout: float = 0.0, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(
            HIDDEN, HEADS, 2 * HIDDEN, dropout=dropout, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=batch_first)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(
        self, input_ids: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if not self.batch_first:
            hidden = hidden.transpose(0, 1)
        hidden = self.encoder(hidden, src_key_padding_mask=padding_mask)
        return self.head(hidden.mean(1 if self.batch_first else 0))


class TimmShapedViTWithDropout(TimmShapedViT):
    """tests.models.TimmShapedViT at the shared size, with dropout in its blocks."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(depth=DEPTH + 1, dim=HIDDEN, heads=HEADS, classes=CLASSES)
        self.blocks = nn.Sequential(*(Block(HIDDEN, HEADS, dropout) for _ in range(DEPTH + 1)))


def _torch_text_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "padding_mask": _padded_mask() == 0}


def _cases() -> list[ModelCase]:
    return [
        ModelCase(
            "bert",
            _hf("BertConfig", "BertForSequenceClassification", _BERT_DROPOUT, **_BERT_LIKE),
            _text_batch,
            DEPTH,
            DEPTH,
            ("bert.encoder.layer",),
        ),
        ModelCase(
            "roberta",
            _hf(
                "RobertaConfig",
                "RobertaForSequenceClassification",
                _BERT_DROPOUT,
                **_BERT_LIKE,
                pad_token_id=0,
            ),
            _text_batch,
            DEPTH,
            DEPTH,
            ("roberta.encoder.layer",),
        ),
        ModelCase(
            "distilbert",
            _hf(
                "DistilBertConfig",
                "DistilBertForSequenceClassification",
                ("dropout", "attention_dropout", "seq_classif_dropout"),
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=DEPTH,
                n_heads=HEADS,
                hidden_dim=2 * HIDDEN,
                max_position_embeddings=32,
                num_labels=CLASSES,
            ),
            _text_batch,
            DEPTH,
            DEPTH,
            ("distilbert.transformer.layer",),
        ),
        ModelCase(
            "albert",
            _hf(
                "AlbertConfig",
                "AlbertForSequenceClassification",
                (*_BERT_DROPOUT, "classifier_dropout_prob"),
                **{**_BERT_LIKE, "num_hidden_layers": 4},
                embedding_size=16,
                num_hidden_groups=1,
                inner_group_num=1,
            ),
            _text_batch,
            4,
            1,
            ("albert.encoder.albert_layer_groups",),
        ),
        ModelCase(
            "deberta_v2",
            _hf(
                "DebertaV2Config",
                "DebertaV2ForSequenceClassification",
                (*_BERT_DROPOUT, "pooler_dropout"),
                **_BERT_LIKE,
                relative_attention=True,
                position_buckets=8,
                pos_att_type=["p2c", "c2p"],
            ),
            _text_batch,
            DEPTH,
            DEPTH,
            ("deberta.encoder.layer",),
        ),
        ModelCase(
            "electra",
            _hf(
                "ElectraConfig",
                "ElectraForSequenceClassification",
                _BERT_DROPOUT,
                **_BERT_LIKE,
                embedding_size=16,  # != hidden: embeddings_project runs before the blocks
            ),
            _text_batch,
            DEPTH,
            DEPTH,
            ("electra.encoder.layer",),
        ),
        ModelCase(
            "gpt2",
            _hf(
                "GPT2Config",
                "GPT2LMHeadModel",
                ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=DEPTH,
                n_head=HEADS,
                n_positions=32,
                bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1,
            ),
            _causal_batch,
            DEPTH,
            DEPTH,
            ("transformer.h",),
        ),
        ModelCase(
            "llama",
            _hf(
                "LlamaConfig",
                "LlamaForCausalLM",
                ("attention_dropout",),
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=2 * HIDDEN,
                num_hidden_layers=DEPTH,
                num_attention_heads=HEADS,
                num_key_value_heads=1,
                max_position_embeddings=32,
            ),
            _causal_batch,
            DEPTH,
            DEPTH,
            ("model.layers",),
        ),
        ModelCase(
            "t5",
            _hf(
                "T5Config",
                "T5ForConditionalGeneration",
                ("dropout_rate",),
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=HIDDEN // HEADS,
                d_ff=2 * HIDDEN,
                num_layers=DEPTH,
                num_decoder_layers=2,
                num_heads=HEADS,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
                pad_token_id=0,
            ),
            _seq2seq_batch,
            DEPTH,
            DEPTH,
            ("encoder.block",),
        ),
        ModelCase(
            "vit",
            _hf(
                "ViTConfig",
                "ViTForImageClassification",
                _BERT_DROPOUT,
                hidden_size=HIDDEN,
                num_hidden_layers=DEPTH,
                num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN,
                image_size=16,
                patch_size=4,
                num_labels=CLASSES,
            ),
            _image_batch("pixel_values"),
            DEPTH,
            DEPTH,
            ("vit.layers", "vit.encoder.layer"),
        ),
        ModelCase(
            "modernbert",
            _hf(
                "ModernBertConfig",
                "ModernBertForSequenceClassification",
                ("embedding_dropout", "attention_dropout", "mlp_dropout", "classifier_dropout"),
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=2 * HIDDEN,
                num_hidden_layers=DEPTH,
                num_attention_heads=HEADS,
                global_attn_every_n_layers=2,
                local_attention=4,
                max_position_embeddings=32,
                num_labels=CLASSES,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                cls_token_id=1,
                sep_token_id=2,
            ),
            _text_batch,
            DEPTH,
            DEPTH,
            ("model.layers",),
        ),
        ModelCase(
            "torch_encoder",
            TorchEncoderClassifier,
            _torch_text_batch,
            DEPTH,
            DEPTH,
            ("encoder.layers",),
            library="torch",
        ),
        ModelCase(
            "torch_encoder_seq_first",
            lambda dropout: TorchEncoderClassifier(dropout, batch_first=False),
            _torch_text_batch,
            DEPTH,
            DEPTH,
            ("encoder.layers",),
            library="torch",
        ),
        ModelCase(
            "timm_vit",
            TimmShapedViTWithDropout,
            _image_batch("images"),
            DEPTH + 1,
            DEPTH + 1,
            ("blocks",),
            library="torch",
        ),
        ModelCase(
            "index_loop",
            lambda dropout: IndexLoopModel(
                depth=DEPTH, dim=HIDDEN, heads=HEADS, classes=CLASSES, vocab=VOCAB, dropout=dropout
            ),
            lambda: {"ids": _ids()},
            DEPTH,
            DEPTH,
            ("layers",),
            library="torch",
        ),
    ]


# -- vision-language models ----------------------------------------------------------------
#
# Each has a vision tower (one or two stacks) and a text decoder of 2 blocks at the shared
# size, takes 8x8 images cut into 4x4 patches, and reads its rows as
# ``[text, image tokens, text..., answer (the last VLM_ANSWER positions)]``, row 1 right-padded
# by 3. Special tokens sit at the top of the vocabulary, text tokens below them.

VLM_SEQ = 12
VLM_ANSWER = 5
VLM_DEPTH = 2
IMAGE_TOKEN = VOCAB - 1  # the image placeholder; VOCAB - 2..4 are the other special tokens
IMAGE = 8
PATCH = 4


def _vlm_ids(image_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB - 4, (BATCH, VLM_SEQ), generator=gen)
    ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN
    return ids


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def _vlm_batch(image_tokens: int, pixel_shape: tuple[int, ...], **extra: Any) -> Any:
    """``batch()`` for a VLM: ids with ``image_tokens`` placeholders, padding, pixels, extras
    (``extra[key](ids) -> tensor``)."""

    def batch() -> dict[str, torch.Tensor]:
        ids = _vlm_ids(image_tokens)
        found = {
            "input_ids": ids,
            "attention_mask": _padded_mask(VLM_SEQ),
            "pixel_values": _pixels(*pixel_shape),
        }
        found.update((key, make(ids)) for key, make in extra.items())
        return found

    return batch


def _text_config(
    name: str, dropout: float, dropout_key: str = "attention_dropout", **config: Any
) -> Any:
    import transformers

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=VLM_DEPTH,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=VOCAB - 4,
        eos_token_id=VOCAB - 4,
    )
    settings[dropout_key] = dropout
    return getattr(transformers, name)(**{**settings, **config})


def _vision_config(name: str, dropout: float, **config: Any) -> Any:
    import transformers

    settings = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=VLM_DEPTH,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        attention_dropout=dropout,
    )
    return getattr(transformers, name)(**{**settings, **config})


def _vlm(model_name: str, config_name: str, **parts: Callable[[float], Any]) -> Any:
    """``make(dropout)``: ``config_name(**{key: part(dropout)})`` then ``model_name(config)``."""

    def make(dropout: float) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(
            **{k: part(dropout) if callable(part) else part for k, part in parts.items()}
        )
        return getattr(transformers, model_name)(config)

    return make


def _llava(dropout: float) -> nn.Module:
    return _vlm(
        "LlavaForConditionalGeneration",
        "LlavaConfig",
        vision_config=lambda d: _vision_config("CLIPVisionConfig", d, projection_dim=HIDDEN),
        text_config=lambda d: _text_config("LlamaConfig", d),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(IMAGE // PATCH) ** 2,
    )(dropout)


def _paligemma(dropout: float) -> nn.Module:
    return _vlm(
        "PaliGemmaForConditionalGeneration",
        "PaliGemmaConfig",
        vision_config=lambda d: _vision_config("SiglipVisionConfig", d),
        text_config=lambda d: _text_config("GemmaConfig", d, head_dim=HIDDEN // HEADS),
        image_token_index=IMAGE_TOKEN,
        vocab_size=VOCAB,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )(dropout)


def _idefics3(prefix: str) -> Callable[[float], nn.Module]:
    def make(dropout: float) -> nn.Module:
        return _vlm(
            f"{prefix}ForConditionalGeneration",
            f"{prefix}Config",
            vision_config=lambda d: _vision_config(f"{prefix}VisionConfig", d),
            text_config=lambda d: _text_config("LlamaConfig", d),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,  # 4 patches -> 1 image token
        )(dropout)

    return make


def _qwen_vl(prefix: str) -> Callable[[float], nn.Module]:
    vision: dict[str, Any] = dict(
        depth=VLM_DEPTH,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=2,  # 4 patches -> 1 image token
        temporal_patch_size=2,
    )
    if prefix == "Qwen2VL":
        vision.update(embed_dim=HIDDEN, mlp_ratio=2)
    else:
        vision.update(
            intermediate_size=2 * HIDDEN,
            out_hidden_size=HIDDEN,
            window_size=IMAGE,
            fullatt_block_indexes=[1],
        )
    # M-RoPE splits the rotary half of each head (8 here) over time, height and width.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}

    def make(dropout: float) -> nn.Module:
        return _vlm(
            f"{prefix}ForConditionalGeneration",
            f"{prefix}Config",
            vision_config=vision,
            text_config=lambda d: _text_config(
                f"{prefix}TextConfig", d, rope_parameters=rope
            ).to_dict(),
            image_token_id=IMAGE_TOKEN,
            video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3,
            vision_end_token_id=VOCAB - 4,
        )(dropout)

    return make


def _gemma3(dropout: float) -> nn.Module:
    return _vlm(
        "Gemma3ForConditionalGeneration",
        "Gemma3Config",
        vision_config=lambda d: _vision_config("SiglipVisionConfig", d),
        text_config=lambda d: _text_config(
            "Gemma3TextConfig",
            d,
            head_dim=HIDDEN // HEADS,
            query_pre_attn_scalar=HIDDEN // HEADS,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        mm_tokens_per_image=(IMAGE // PATCH) ** 2,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )(dropout)


def _mllama(dropout: float) -> nn.Module:
    import transformers

    vision = transformers.MllamaVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=VLM_DEPTH,
        num_global_layers=1,
        attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        max_num_tiles=1,
        vision_output_dim=2 * HIDDEN,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    text = _text_config(
        "MllamaTextConfig",
        dropout,
        dropout_key="dropout",
        cross_attention_layers=[1],  # block 0 attends to the text, block 1 to the image
    )
    config = transformers.MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN
    )
    return transformers.MllamaForConditionalGeneration(config)


def _vlm_cases() -> list[ModelCase]:
    def case(name: str, make: Any, batch: Any, text: str, vision: tuple[str, ...]) -> ModelCase:
        return ModelCase(name, make, batch, VLM_DEPTH, VLM_DEPTH, (text,), vision=vision)

    image = (BATCH, 3, IMAGE, IMAGE)
    patches = (IMAGE // PATCH) ** 2
    qwen_pixels = (BATCH * patches, 3 * PATCH * PATCH * 2)  # patches flattened, 2 frames each
    qwen = dict(
        image_grid_thw=lambda ids: torch.tensor([[1, IMAGE // PATCH, IMAGE // PATCH]] * BATCH),
        mm_token_type_ids=lambda ids: (ids == IMAGE_TOKEN).long(),
    )
    return [
        case(
            "llava",
            _llava,
            _vlm_batch(patches, image),
            "model.language_model.layers",
            ("model.vision_tower.encoder.layers",),
        ),
        case(
            "paligemma",
            _paligemma,
            # 0 on the prefix (image and prompt: attended both ways), 1 on the answer
            _vlm_batch(
                patches,
                image,
                token_type_ids=lambda ids: (
                    (torch.arange(VLM_SEQ) >= VLM_SEQ - VLM_ANSWER).long().expand(BATCH, -1)
                ),
            ),
            "model.language_model.layers",
            ("model.vision_tower.encoder.layers",),
        ),
        case(
            "idefics3",
            _idefics3("Idefics3"),
            _vlm_batch(1, (BATCH, 1, 3, IMAGE, IMAGE)),
            "model.text_model.layers",
            ("model.vision_model.encoder.layers",),
        ),
        case(
            "smolvlm",
            _idefics3("SmolVLM"),
            _vlm_batch(1, (BATCH, 1, 3, IMAGE, IMAGE)),
            "model.text_model.layers",
            ("model.vision_model.encoder.layers",),
        ),
        case(
            "qwen2_vl",
            _qwen_vl("Qwen2VL"),
            _vlm_batch(1, qwen_pixels, **qwen),
            "model.language_model.layers",
            ("model.visual.blocks",),
        ),
        case(
            "qwen2_5_vl",
            _qwen_vl("Qwen2_5_VL"),
            _vlm_batch(1, qwen_pixels, **qwen),
            "model.language_model.layers",
            ("model.visual.blocks",),
        ),
        case(
            "gemma3",
            _gemma3,
            # 1 on image tokens (attended both ways within the image)
            _vlm_batch(patches, image, token_type_ids=lambda ids: (ids == IMAGE_TOKEN).long()),
            "model.language_model.layers",
            ("model.vision_tower.encoder.layers",),
        ),
        case(
            "mllama",
            _mllama,
            _vlm_batch(
                1,
                (BATCH, 1, 1, 3, IMAGE, IMAGE),  # one image of one tile per row
                aspect_ratio_ids=lambda ids: torch.ones(BATCH, 1, dtype=torch.long),
                aspect_ratio_mask=lambda ids: torch.ones(BATCH, 1, 1, dtype=torch.long),
                cross_attention_mask=lambda ids: torch.ones(BATCH, VLM_SEQ, 1, 1, dtype=torch.long),
            ),
            "model.language_model.layers",
            (
                "model.vision_model.transformer.layers",
                "model.vision_model.global_transformer.layers",
            ),
        ),
    ]


VLM_CASES: dict[str, ModelCase] = {case.name: case for case in _vlm_cases()}
"""Vision-language models (transformers), by test id: ``paths`` is the text decoder's stack,
``vision`` the vision tower's."""

CASES: dict[str, ModelCase] = {case.name: case for case in _cases()}
"""Every architecture, by test id."""

HF_CASES = [name for name, case in CASES.items() if case.library == "transformers"]
