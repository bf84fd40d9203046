"""LLM fine-tuning through the integrations: the causal shift of the token mask, a noisy pass
without the task loss, padding- and packing-aware noise from the batch, TRL's SFTTrainer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import CASES

import rapt_reg
from rapt_reg.integrations.masks import causal_token_mask, noise_inputs, token_mask

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]


# -- masks from the batch -----------------------------------------------------------------------


@pytest.mark.promise("causal-mask-shift")
def test_causal_mask_follows_the_shift() -> None:
    """logits[t] is judged by labels[t + 1]: prompt (-100) then answer, then padding."""
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 7, 8]])
    assert causal_token_mask({"labels": labels}).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]
    assert token_mask({"labels": labels}).tolist() == (labels != -100).tolist()
    shifted = torch.tensor([[5, -100]])
    assert causal_token_mask({"labels": labels, "shift_labels": shifted}).tolist() == [
        [True, False]
    ]
    assert causal_token_mask({"labels": torch.tensor([0, 1])}) is None  # sequence-level
    assert causal_token_mask({}) is None


@pytest.mark.promise("noise-inputs")
def test_noise_inputs_from_attention_mask_and_position_ids() -> None:
    batch = {
        "attention_mask": torch.tensor([[1, 1, 0]]),
        "position_ids": torch.tensor([[0, 1, 0]]),
    }
    found = noise_inputs(batch)
    assert found["noise_mask"].dtype == torch.bool
    assert found["noise_mask"].tolist() == [[True, True, False]]
    assert found["segment_ids"].tolist() == [[1, 1, 2]]
    packed = noise_inputs({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])})
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    assert noise_inputs({"attention_mask": torch.ones(2, 1, 3, 3)}) == {}  # 4-D masks: left out


# -- the Trainer's two passes -------------------------------------------------------------------


def _record_calls(model: torch.nn.Module) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    return calls


def _trainer(tmp_path: Path, model: torch.nn.Module, **kwargs: Any) -> Any:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from rapt_reg.integrations.transformers import RaptTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return RaptTrainer(model=model, args=args, **kwargs)


@pytest.mark.promise("noisy-pass-without-labels", "noise-inputs")
def test_causal_lm_noisy_pass_has_no_labels_and_noise_skips_padding(tmp_path: Path) -> None:
    case = CASES["llama"]
    model = case.build()
    batch = dict(case.batch())
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, -3:] = 0
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, max_layer=0)
    trainer = _trainer(tmp_path, model, rapt_regularizer=reg)
    calls = _record_calls(model)
    seen: list[torch.Tensor] = []  # the input of the first block, after the noise went in
    reg.stack.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).detach()
        ),
        with_kwargs=True,
    )
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.requires_grad
    clean, noisy = calls
    assert "labels" in clean and "labels" not in noisy
    assert noisy.keys() == clean.keys() - {"labels"}
    delta = seen[1] - seen[0]
    padding = batch["attention_mask"] == 0
    assert bool((delta[padding] == 0).all()) and bool((delta[~padding] != 0).all())
    torch.testing.assert_close(delta[~padding].abs().amax(), torch.tensor(2.0))


@pytest.mark.promise("noisy-pass-without-labels")
def test_seq2seq_noisy_pass_gets_decoder_inputs_from_the_labels(tmp_path: Path) -> None:
    case = CASES["t5"]
    model = case.build()
    batch = {k: v for k, v in case.batch().items() if k != "decoder_input_ids"}
    batch["labels"] = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(0))
    trainer = _trainer(tmp_path, model)
    calls = _record_calls(model)
    trainer.compute_loss(model, dict(batch))
    clean, noisy = calls
    assert "labels" in clean and "labels" not in noisy
    assert torch.equal(noisy["decoder_input_ids"], model._shift_right(batch["labels"]))


# -- TRL's SFTTrainer ---------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "and", "quick", "slow"]


def _tiny_llm() -> tuple[Any, Any]:
    """A word-level tokenizer built offline and a 3-block Llama with random weights."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return tokenizer, transformers.LlamaForCausalLM(config)


def _sft_args(tmp_path: Path, **config: Any) -> Any:
    trl = pytest.importorskip("trl")
    return trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
        learning_rate=1e-3,
        **config,
    )


def _sentences() -> Any:
    datasets = pytest.importorskip("datasets")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(12)]
    return datasets.Dataset.from_dict({"text": texts})


@pytest.mark.promise("sft-trainer")
@pytest.mark.promise("sft-fused-head")
def test_sft_trainer_keeps_its_fused_head_by_default(tmp_path: Path) -> None:
    """By default with_rapt(SFTTrainer) keeps TRL's own loss (fused LM head, any loss_type,
    its metrics logged) and builds the head-aware penalty; with head=None it falls back to
    the model's own NLL and refuses other loss types."""
    trl = pytest.importorskip("trl")
    from rapt_reg.integrations import with_rapt

    tokenizer, model = _tiny_llm()
    settings = dict(
        model=model,
        args=_sft_args(tmp_path, loss_type="dft"),
        train_dataset=_sentences(),
        processing_class=tokenizer,
    )
    trainer = with_rapt(trl.SFTTrainer)(**settings)
    trainer.train()
    assert trainer.rapt.head is model.lm_head
    logged = [entry for entry in trainer.state.log_history if "rapt_penalty" in entry]
    assert len(logged) == 2 and all(e["rapt_penalty"] > 0 for e in logged)
    assert all("mean_token_accuracy" in e for e in logged)  # TRL's own compute_loss ran
    trainer.rapt.remove()
    fallback = with_rapt(trl.SFTTrainer)(**settings, rapt_kwargs={"head": None})
    with pytest.raises(rapt_reg.RaptRegError, match="loss_type='nll' only, got 'dft'"):
        fallback.train()


@pytest.mark.promise("neftune-refused")
def test_sft_trainer_refuses_neftune_unless_allowed(tmp_path: Path) -> None:
    """TRL's SFTConfig takes NEFTune from TrainingArguments (transformers' Trainer runs it)."""
    trl = pytest.importorskip("trl")
    from rapt_reg.integrations import with_rapt

    tokenizer, model = _tiny_llm()
    settings = dict(
        model=model,
        args=_sft_args(tmp_path, neftune_noise_alpha=5.0),
        train_dataset=_sentences(),
        processing_class=tokenizer,
    )
    with pytest.raises(rapt_reg.RaptRegError, match="NEFTune.*rapt_allow_neftune=True"):
        with_rapt(trl.SFTTrainer)(**settings)
    trainer = with_rapt(trl.SFTTrainer)(**settings, rapt_allow_neftune=True)
    assert trainer.neftune_noise_alpha == 5.0


@pytest.mark.promise("sft-trainer", "lora")
def test_sft_trainer_with_lora_and_packing(tmp_path: Path) -> None:
    """SFTTrainer wraps the model in PEFT itself: the penalty trains the adapters."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from rapt_reg.integrations import with_rapt

    tokenizer, model = _tiny_llm()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = with_rapt(trl.SFTTrainer)(
        model=model,
        args=_sft_args(tmp_path, packing=True),
        train_dataset=_sentences(),
        processing_class=tokenizer,
        peft_config=lora,
        rapt_kwargs={"min_layer": 0},
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    logged = [
        entry["rapt_penalty"] for entry in trainer.state.log_history if "rapt_penalty" in entry
    ]
    assert len(logged) == 2 and all(value > 0 for value in logged)
    assert trainer.rapt is not None and trainer.rapt.model is model  # seen through PEFT
    params = dict(trainer.model.named_parameters())
    assert adapters and any(not torch.equal(v, params[n]) for n, v in adapters.items())


@pytest.mark.promise("sft-trainer")
@pytest.mark.parametrize("packing", [False, True], ids=["padding", "packing"])
def test_sft_trainer_with_rapt(tmp_path: Path, packing: bool) -> None:
    trl = pytest.importorskip("trl")
    from rapt_reg.integrations import with_rapt

    tokenizer, model = _tiny_llm()
    dataset = _sentences()
    args = _sft_args(tmp_path, packing=packing)
    reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, max_layer=3)
    handed: list[dict[str, Any]] = []
    pair = reg.pair

    def spy(forward: Any, **kwargs: Any) -> Any:
        handed.append(kwargs)
        return pair(forward, **kwargs)

    reg.pair = spy  # type: ignore[method-assign]
    samples = []
    noisy_pass = reg._noisy_pass

    def counting(forward: Any, layer: int, perturb: Any, *rest: Any) -> Any:  # noise drawn
        return noisy_pass(forward, layer, lambda h, b: samples.append(1) or perturb(h, b), *rest)

    reg._noisy_pass = counting  # type: ignore[method-assign]
    trainer = with_rapt(trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        rapt_regularizer=reg,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rapt_penalty" in entry]
    assert len(logged) == 2 and all(entry["rapt_penalty"] > 0 for entry in logged)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(handed) == 2 and len(samples) == 2
    for kwargs in handed:
        assert kwargs["mask"] is not None
        if packing:  # one row, several examples, no padding mask
            assert "noise_mask" not in kwargs
            assert kwargs["segment_ids"].shape[0] == 1 and int(kwargs["segment_ids"].max()) > 1
        else:
            assert "segment_ids" not in kwargs
            assert not bool(kwargs["noise_mask"].all())  # the batch has padding
    # Evaluation and prediction forwards never get noise.
    trainer.evaluate()
    trainer.predict(trainer.eval_dataset)
    assert len(samples) == 2 and len(handed) == 2


# -- Lightning ----------------------------------------------------------------------------------


@pytest.mark.promise("noise-inputs")
def test_lightning_rapt_pair_takes_the_masks_from_the_batch() -> None:
    from models import TinyTransformer

    from rapt_reg.integrations.lightning import RaptLightningMixin

    class Module(RaptLightningMixin, torch.nn.Module):
        rapt_log = False
        rapt_kwargs = {"min_layer": 0, "max_layer": 0}

        def __init__(self) -> None:
            super().__init__()
            self.model = TinyTransformer(depth=2, token_level=True)

    module = Module().train()
    handed: list[dict[str, Any]] = []
    pair = module.rapt.pair
    module.rapt.pair = lambda forward, **kw: handed.append(kw) or pair(forward, **kw)  # type: ignore[method-assign]
    ids = torch.randint(0, 50, (2, 5))
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), "position_ids": None}
    module.rapt_pair(lambda: module.model(ids), batch=batch)
    assert handed[-1]["noise_mask"].tolist() == batch["attention_mask"].bool().tolist()
    packed = {"position_ids": torch.tensor([[0, 1, 0, 1, 2]] * 2)}
    module.rapt_pair(lambda: module.model(ids), batch=packed)
    assert handed[-1]["segment_ids"].tolist() == [[1, 1, 2, 2, 2]] * 2
    explicit = torch.ones(2, 5, dtype=torch.bool)
    module.rapt_pair(lambda: module.model(ids), batch=batch, noise_mask=explicit)
    assert handed[-1]["noise_mask"] is explicit


@pytest.mark.promise("causal-mask-shift")
def test_the_llm_recipe_runs() -> None:
    """docs/recipes.md's hand-written LLM step: padding, shift, no second loss, hidden_rms."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    code = re.search(r"## Fine-tuning LLMs.*?```python\n(.*?)```", text, re.S).group(1)
    case = CASES["llama"]
    model, batch = case.build(), dict(case.batch())
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, -2:] = 0
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    scope: dict[str, Any] = {"model": model, "batch": batch}
    exec(code, scope)
    assert scope["penalty"] > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
