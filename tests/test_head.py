"""The head-aware penalty (``head=``): the noisy pass builds no logits, and the divergence made
chunk by chunk from both passes' last hidden states and the head's weight is the plain formula's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rapt_reg
from rapt_reg import divergence as div
from rapt_reg.baselines import R3FRegularizer, SmartRegularizer
from rapt_reg.head import Head

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-6}


def _plain(fn, noisy_h, clean, head: Head, mask, clean_is_hidden):
    """The formula on whole tensors: full logits, the mean over the kept positions."""

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, head.weight, head.bias).to(torch.promote_types(h.dtype, torch.float32))
        out = out * head.scale
        return out if head.softcap is None else torch.tanh(out / head.softcap) * head.softcap

    values = fn(logits(noisy_h), logits(clean) if clean_is_hidden else clean)
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / (scale or 1.0)


@pytest.mark.promise("head-exact")
@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
    hidden=st.integers(1, 12),
    vocab=st.integers(1, 40),
    masking=st.sampled_from(["none", "random", "all_false"]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 3.0, 30.0]),
    scale=st.sampled_from([1.0, 0.5]),
    clean_is_hidden=st.booleans(),
    name=st.sampled_from(sorted(div.DIVERGENCES)),
    chunk=st.one_of(st.none(), st.integers(1, 7)),
    seed=st.integers(0, 2**31),
)
def test_head_aware_divergence_equals_the_plain_formula(
    dtype, leading, hidden, vocab, masking, bias, softcap, scale, clean_is_hidden, name, chunk, seed
):
    """Value and the gradients of both sides, the weight and the bias, to 1e-9 (float64) or
    1e-6 (float32) relative, with NaN at every position the mask leaves out."""
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(*leading, hidden, generator=gen, dtype=dtype) * 2
    width = hidden if clean_is_hidden else vocab
    clean = torch.randn(*leading, width, generator=gen, dtype=dtype) * 2
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    mask = None
    if masking != "none":
        mask = torch.rand(leading, generator=gen) < (0.6 if masking == "random" else 0.0)
    tensors = [t.requires_grad_() for t in (noisy, clean, weight, *([b] if bias else []))]
    head = Head(weight, b, scale, softcap)
    fn = div.resolve(name)
    reference = _plain(fn, noisy, clean, head, mask, clean_is_hidden)
    expected = torch.autograd.grad(reference, tensors, allow_unused=True)
    inputs = [noisy, clean]
    if mask is not None:  # NaN where the mask is false: it must reach nothing
        inputs = [torch.where(mask[..., None], x, float("nan")) for x in inputs]
    value = div.reduce_divergence(
        fn, *inputs, mask, head=head, clean_is_hidden=clean_is_hidden, chunk_positions=chunk
    )
    got = torch.autograd.grad(value, tensors, allow_unused=True)
    bound = TOLERANCE[dtype]
    assert _relative(value, reference) <= bound
    for ours, want in zip(got, expected):
        if want is None:
            assert ours is None or not ours.any()
            continue
        assert ours is not None and torch.isfinite(ours).all()
        assert _relative(ours, want) <= bound


@pytest.mark.promise("head-once")
def test_a_head_penalty_makes_each_chunks_logits_once_and_is_backpropagated_once():
    """With head= the gradients are made in the forward, in its one pass over each chunk's
    logits; a second backward (retain_graph=True) is refused. The logits penalty recomputes
    each chunk in every backward instead."""
    calls = []

    def counted(a, b):
        calls.append(a.shape[0])
        return div.sym_kl(a, b)

    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    head = Head(weight)
    value = div.reduce_divergence(
        counted, hidden, torch.randn(6, 4), head=head, clean_is_hidden=True, chunk_positions=2
    )
    value.backward(retain_graph=True)
    assert calls == [2, 2, 2] and weight.grad is not None and hidden.grad is not None
    with pytest.raises(ValueError, match="backpropagated twice"):
        value.backward()
    logits = F.linear(hidden, weight)
    value = div.reduce_divergence(counted, logits, logits.detach() + 1, chunk_positions=2)
    value.backward(retain_graph=True)
    value.backward()
    assert calls == [2] * 12


# -- through the regularizers: transformers causal LMs ----------------------------------------


def _causal_lm(kind: str, tied: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    if kind == "cohere":  # logits scaled by logit_scale
        config = transformers.CohereConfig(**common, logit_scale=0.25)
        cls = transformers.CohereForCausalLM
    elif kind == "granite":  # logits divided by logits_scaling
        config = transformers.GraniteConfig(**common, logits_scaling=4.0)
        cls = transformers.GraniteForCausalLM
    elif kind == "gemma2":  # soft-capped logits
        config = transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None,
            query_pre_attn_scalar=8, sliding_window=16,
        )  # fmt: skip
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    return cls(config).double().train()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, -4:] = 0
    return {"input_ids": ids, "attention_mask": attention}


def _step(model: nn.Module, make, head, form: str):
    """One step's penalty and every parameter's gradient (the task loss left out)."""
    batch = _batch()
    mask = batch["attention_mask"].bool()
    model.zero_grad(set_to_none=True)
    with make(model, head) as reg:
        if form == "pair":
            clean, penalty = reg.pair(lambda: model(**batch), mask=mask)
        else:
            clean = model(**batch)
            penalty = reg(lambda: model(**batch), clean, mask=mask)
        (clean.logits.sum() * 0 + penalty).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return penalty.detach(), grads


REGULARIZERS = {
    "rapt": lambda m, head: rapt_reg.RandomPerturbationRegularizer(
        m, min_layer=2, max_layer=2, generator=torch.Generator().manual_seed(0), head=head
    ),
    "rapt-embedding": lambda m, head: rapt_reg.RandomPerturbationRegularizer(
        m, min_layer=0, max_layer=0, generator=torch.Generator().manual_seed(0), head=head
    ),
    "smart": lambda m, head: SmartRegularizer(
        m,
        k=1,
        step_size=1e-2,
        noise_var=1e-2,
        generator=torch.Generator().manual_seed(0),
        head=head,
    ),  # fmt: skip
    "r3f": lambda m, head: R3FRegularizer(
        m, eps=0.1, generator=torch.Generator().manual_seed(0), head=head
    ),
}


@pytest.mark.promise("head-exact")
@pytest.mark.parametrize("form", ["pair", "call"])
@pytest.mark.parametrize("method", REGULARIZERS)
@pytest.mark.parametrize(
    ("kind", "tied"),
    [("llama", False), ("llama", True), ("gemma2", False), ("cohere", True), ("granite", False)],
)
def test_head_aware_penalty_equals_the_logits_penalty(kind, tied, method, form):
    """float64: the same penalty and gradients as comparing the logits the forward returns, for
    every method, both call forms, tied and untied heads, and Gemma 2's soft-capped logits."""
    model = _causal_lm(kind, tied)
    make = REGULARIZERS[method]
    reference, reference_grads = _step(model, make, None, form)
    penalty, grads = _step(model, make, "auto", form)
    assert reference > 0
    torch.testing.assert_close(penalty, reference, rtol=1e-9, atol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-9, atol=1e-12, msg=name)


class _LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most positions a tensor with a vocabulary-sized last dimension holds, while
    ``active`` (the head's transposed weight ``[hidden, vocab]`` is no logits)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest, self.active = vocab, 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            logits = isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab
            if self.active and logits and tuple(t.shape) != (16, self.vocab):
                self.largest = max(self.largest, t.numel() // self.vocab)
        return out


@pytest.mark.promise("head-no-noisy-logits")
def test_the_noisy_pass_and_the_penalty_build_no_whole_logits(monkeypatch):
    """With head='auto' and reg.pair: after the clean pass (the model's own), through the noisy
    pass, the penalty and its backward, no tensor holds more than one chunk of positions'
    logits (4 of 30 here); the noisy pass's logits have no position at all (one on the first
    pass, compared with the penalty's own)."""
    monkeypatch.setattr(div, "HEAD_CHUNK_BYTES", 4 * 4 * 96)  # 4 positions of a 96-word vocabulary
    model = _causal_lm("llama")
    batch = _batch()
    reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=1, max_layer=1, head="auto")
    shapes = []
    handle = model.register_forward_hook(lambda m, a, out: shapes.append(out.logits.shape))
    with _LargestLogits(96) as watch:

        def forward():
            watch.active = len(shapes) % 2 == 1  # a clean pass (the first) is the model's business
            return model(**batch)

        for _ in range(2):
            _, penalty = reg.pair(forward)
            penalty.backward()
            watch.active = False
    handle.remove()
    reg.remove()
    assert shapes[1::2] == [torch.Size([3, 1, 96]), torch.Size([3, 0, 96])]
    assert watch.largest == 4


@pytest.mark.promise("head-refused")
def test_a_head_whose_logits_the_model_transforms_otherwise_is_not_guessed():
    """head= a module that is not a linear layer is refused at construction; a model that
    transforms its head's output in a way rapt_reg does not apply (here: doubles it) is refused
    at the first noisy pass, which hands the head one position and compares its logits."""
    model = _causal_lm("llama")
    with pytest.raises(rapt_reg.RaptRegError, match="head=None"):
        rapt_reg.RandomPerturbationRegularizer(model, head="model.norm")

    class Doubled(type(model)):  # type: ignore[misc]
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    doubled = Doubled(model.config).double().train()
    batch = _batch()
    reg = rapt_reg.RandomPerturbationRegularizer(doubled, min_layer=1, max_layer=1, head="auto")
    with pytest.raises(rapt_reg.RaptRegError, match="scales, caps or slices them.*head=None"):
        reg.pair(lambda: doubled(**batch))
    reg.remove()


def _fused_loss_llama(tied: bool = False) -> nn.Module:
    """A Llama whose training loss is a chunked cross-entropy from the body's output and the
    head's weight, with no logits (Liger's fused linear cross-entropy, as transformers'
    ``use_liger_kernel`` patches it in; Liger itself needs a GPU)."""
    plain = _causal_lm("llama", tied)

    class FusedLossLlama(type(plain)):  # type: ignore[misc]
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            if labels is None:
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
            flat, total = hidden.reshape(-1, hidden.shape[-1]), hidden.new_zeros(())
            for rows in range(0, flat.shape[0], 8):  # never the whole [positions, vocab]
                chunk = F.linear(flat[rows : rows + 8], self.lm_head.weight)
                total = total + F.cross_entropy(chunk, shifted[rows : rows + 8], reduction="sum")
            loss = total / (shifted != -100).sum()
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=None)

    transformers = pytest.importorskip("transformers")
    fused = FusedLossLlama(plain.config).double().train()
    fused.load_state_dict(plain.state_dict())
    return fused


@pytest.mark.promise("head-fused-loss")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_fused_loss_that_makes_no_logits_gets_the_same_penalty(tied):
    """reg.pair with head='auto' on a model whose loss makes no logits: the clean side is the
    body's output (the head's input), the penalty and gradients those of the logits penalty."""
    batch = {**_batch(), "labels": _batch()["input_ids"]}
    noisy_batch = {k: v for k, v in batch.items() if k != "labels"}
    results = []
    for model, head in ((_causal_lm("llama", tied), None), (_fused_loss_llama(tied), "auto")):
        reg = rapt_reg.RandomPerturbationRegularizer(
            model, min_layer=1, max_layer=1, head=head, generator=torch.Generator().manual_seed(0)
        )
        calls = iter([batch, noisy_batch])  # the clean pass computes the loss, the noisy one not
        out, penalty = reg.pair(
            lambda m=model, c=calls: m(**next(c)), mask=batch["attention_mask"].bool()
        )
        penalty.backward()  # (transformers computes Llama's own loss in float32: left out)
        results.append((out, penalty.detach(), {n: p.grad for n, p in model.named_parameters()}))
        reg.remove()
    (plain, expected, expected_grads), (fused, penalty, grads) = results
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(penalty, expected, rtol=1e-9, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    model = _fused_loss_llama()
    with (
        rapt_reg.RandomPerturbationRegularizer(model) as reg,
        pytest.raises(
            rapt_reg.RaptRegError, match="fused loss that makes no logits needs head='auto'"
        ),
    ):
        reg.pair(lambda: model(**batch))


@pytest.mark.promise("sft-fused-head", "head-fused-loss")
def test_the_trainer_with_a_liger_style_loss_builds_the_head_aware_penalty(
    tmp_path, accelerator_state, monkeypatch
):
    """use_liger_kernel=True (Liger needs a GPU: its patching is a no-op here, and the model's
    own forward fuses the loss as Liger's would): the Trainer's regularizer gets head='auto'
    and trains; without it, the refusal names head='auto'."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from rapt_reg.integrations import RaptTrainer

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", lambda *a, **k: None)
    ids = torch.randint(3, 96, (8, 10), generator=torch.Generator().manual_seed(2)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    for liger in (True, False):
        trainer = RaptTrainer(model=_fused_loss_llama().float(), args=args, train_dataset=data)
        trainer.args.use_liger_kernel = liger  # set after construction: Liger is not installed
        if not liger:
            with pytest.raises(rapt_reg.RaptRegError, match="needs head='auto'"):
                trainer.train()
            continue
        trainer.train()
        assert trainer.rapt.head is trainer.model.lm_head
        logged = [e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e]
        assert len(logged) == 2 and all(p > 0 for p in logged)
        trainer.rapt.remove()
