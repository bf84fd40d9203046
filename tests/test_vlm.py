"""Vision-language models trained through the Trainer integration: the text decoder is the
perturbed stack, the penalty counts the positions whose *next* label is trained, padding gets
no noise. One tiny random model per family transformers ships (``hf_models.VLM_CASES``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import BATCH, CASES, VLM_ANSWER, VLM_CASES, VLM_SEQ

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]


def _rows(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One dict per example. Inputs without a batch dimension (Qwen2-VL's patches, all the
    images' patches in one ``[patches, features]`` tensor) are cut into equal parts."""
    rows: list[dict[str, torch.Tensor]] = [{"labels": row} for row in labels]
    for key, value in batch.items():
        parts = value if len(value) == BATCH else value.view(BATCH, -1, *value.shape[1:])
        for row, part in zip(rows, parts):
            row[key] = part
    return rows


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the rows; concatenate the parts of inputs without a batch dimension."""
    flat = {"pixel_values"} if rows[0]["pixel_values"].ndim == 2 else set()
    return {
        key: (torch.cat if key in flat else torch.stack)([row[key] for row in rows])
        for key in rows[0]
    }


def _answer_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last VLM_ANSWER tokens are trained; image tokens, prompt and padding are not."""
    prompt = torch.arange(VLM_SEQ) < VLM_SEQ - VLM_ANSWER
    return batch["input_ids"].masked_fill(prompt | (batch["attention_mask"] == 0), -100)


def _sym_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    log_p, log_q = noisy.log_softmax(-1), clean.log_softmax(-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


@pytest.mark.promise(
    "vlm-text-decoder", "vlm-next-token-mask", "vlm-image-tokens", "padding-excluded"
)
@pytest.mark.parametrize("name", list(VLM_CASES))
def test_vlm_trainer_step_perturbs_the_text_decoder_at_the_trained_positions(
    tmp_path: Path, accelerator_state: None, name: str
) -> None:
    """A RaptTrainer step with the defaults (noise after text block 1): the regularizer the
    Trainer built perturbs the text decoder's blocks (by identity); the logged penalty is the
    symmetric KL written out by hand over the positions whose next label is trained (answer
    tokens only: image tokens, prompt and padding are -100), which differs from the mean over
    the positions whose own label is; the hidden states of the padding get no noise."""
    transformers = pytest.importorskip("transformers")
    from rapt_reg.integrations import RaptTrainer

    case = VLM_CASES[name]
    model, batch = case.build(), case.batch()
    text_blocks = model.get_submodule(case.paths[0])
    assert all(any(b is m for m in model.get_decoder().modules()) for b in text_blocks)
    calls: list[dict[str, Any]] = []  # the model's inputs: clean pass, then noisy pass
    logits: list[torch.Tensor] = []
    entering: list[torch.Tensor] = []  # the hidden states entering text block 1, noise in
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    model.register_forward_hook(lambda m, a, out: logits.append(out.logits.detach()))
    text_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: entering.append((a[0] if a else kw["hidden_states"]).detach()),
        with_kwargs=True,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RaptTrainer(
        model=model,
        args=args,
        train_dataset=_rows(batch, _answer_labels(batch)),
        data_collator=_collate,
        rapt_kwargs={"min_layer": 1, "max_layer": 1},
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    reg = trainer.rapt
    assert reg is not None and reg.stack.path == case.paths[0]
    assert reg.stack.blocks == tuple(text_blocks)
    assert len(calls) == len(logits) == len(entering) == 2
    clean_inputs, noisy_inputs = calls
    assert "labels" in clean_inputs and "labels" not in noisy_inputs
    labels, attention = clean_inputs["labels"], clean_inputs["attention_mask"]
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100  # logits[t] predicts token t + 1
    assert not torch.equal(counted, labels != -100)
    per_position = _sym_kl(logits[1], logits[0])
    logged = [e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e]
    assert len(logged) == 1
    expected = per_position[counted].mean()
    torch.testing.assert_close(torch.tensor(logged[0]), expected, rtol=1e-5, atol=1e-9)
    unshifted = per_position[labels != -100].mean()
    assert not torch.isclose(unshifted, expected, rtol=1e-3)
    delta = entering[1] - entering[0]
    assert bool((delta[attention == 0] == 0).all())
    assert bool((delta[attention == 1] != 0).all())  # image tokens are real tokens: noised
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.promise("vlm-next-token-mask")
def test_is_causal_lm_covers_multimodal_generators_and_not_encoder_decoders() -> None:
    pytest.importorskip("transformers")
    from rapt_reg.integrations.transformers import is_causal_lm

    for name, case in VLM_CASES.items():
        assert is_causal_lm(case.build()), name
    assert is_causal_lm(CASES["llama"].build()) and is_causal_lm(CASES["gpt2"].build())
    assert not is_causal_lm(CASES["t5"].build())
    assert not is_causal_lm(CASES["bert"].build())
    assert not is_causal_lm(CASES["vit"].build())
