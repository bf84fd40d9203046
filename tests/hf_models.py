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
    """

    name: str
    make: Callable[[float], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor]]
    depth: int
    modules: int
    paths: tuple[str, ...]
    library: str = "transformers"

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


def _padded_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 3 :] = 0  # one padded example, so masks are exercised
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


CASES: dict[str, ModelCase] = {case.name: case for case in _cases()}
"""Every architecture, by test id."""

HF_CASES = [name for name, case in CASES.items() if case.library == "transformers"]
