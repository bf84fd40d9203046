"""Frameworks around the model: PEFT/LoRA, accelerate, Lightning, the transformers Trainer, and
``import rapt_reg`` with torch alone."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_models import CASES, logits, task_loss
from torch import nn

import rapt_reg

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("transformers", "peft", "accelerate", "lightning", "pytorch_lightning")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- lazy imports -----------------------------------------------------------------------------


@pytest.mark.promise("core-without-numpy", "lazy-imports")
def test_import_works_with_torch_alone() -> None:
    """Every optional framework blocked: rapt_reg, its integrations package and the Lightning
    mixin import and work; the Trainer helper says what to install."""
    result = _python(
        f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # "import name" now raises ImportError
        import torch, rapt_reg, rapt_reg.integrations
        from rapt_reg.integrations import RaptLightningMixin
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2), torch.nn.Linear(8, 3))
        x = torch.randn(2, 4, 8)
        with rapt_reg.RandomPerturbationRegularizer(model, max_layer=2) as reg:
            assert reg.pair(lambda: model(x))[1] > 0
        try:
            from rapt_reg.integrations import RaptTrainer
        except ImportError as exc:
            assert "pip install" in str(exc), exc
        else:
            raise AssertionError("RaptTrainer imported without transformers")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.promise("lazy-imports")
def test_import_loads_no_optional_framework() -> None:
    result = _python(
        f"""
        import sys
        import rapt_reg, rapt_reg.integrations, rapt_reg.integrations.lightning
        print(sorted(name for name in {OPTIONAL!r} if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- PEFT -------------------------------------------------------------------------------------


@pytest.mark.promise("wrappers-seen-through", "lora")
@pytest.mark.parametrize(
    ("name", "targets"),
    [("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"])],
    ids=["bert", "llama"],
)
def test_lora_model_is_seen_through(name: str, targets: list[str]) -> None:
    peft = pytest.importorskip("peft")
    case = CASES[name]
    base, batch = case.build(), case.batch()
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, task_type=task))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    outputs = logits(model(**batch)).detach()

    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=case.depth, generator=torch.Generator().manual_seed(0)
    )
    assert reg.stack.path in case.paths
    assert reg.stack.blocks == tuple(base.get_submodule(reg.stack.path).children())
    for form in ("call", "pair"):
        model.zero_grad(set_to_none=True)
        if form == "pair":
            clean, penalty = reg.pair(lambda: model(**batch))
        else:
            clean = model(**batch)
            penalty = reg(lambda: model(**batch), clean)
        assert penalty > 0
        (task_loss(clean) + penalty).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == trainable
        assert all(bool(g.isfinite().all()) for g in grads.values())
        # LoRA's B starts at zero, so its gradient is what trains the adapters.
        assert any(bool(g.ne(0).any()) for n, g in grads.items() if "lora_B" in n)
    reg.remove()
    assert torch.equal(logits(model(**batch)), outputs)


# -- accelerate -------------------------------------------------------------------------------


@pytest.fixture
def accelerator_state() -> Iterator[None]:
    """accelerate keeps process-wide state; start and end each test from a clean one."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    yield
    state.AcceleratorState._reset_state(True)


@pytest.mark.promise("accelerate")
@pytest.mark.parametrize("built", ["before_prepare", "after_prepare"])
def test_accelerate_prepare_bf16_with_accumulation(accelerator_state: None, built: str) -> None:
    from accelerate import Accelerator

    case = CASES["bert"]
    model, batch = case.build(), case.batch()
    labels = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    generator = torch.Generator().manual_seed(0)
    if built == "before_prepare":
        reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, generator=generator)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if built == "after_prepare":
        reg = rapt_reg.RandomPerturbationRegularizer(prepared, min_layer=0, generator=generator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared.train()
    head_dtypes = []  # accelerate casts outputs back to float32: look inside instead
    probe = model.classifier.register_forward_hook(lambda m, a, out: head_dtypes.append(out.dtype))
    penalties = []
    for _ in range(4):
        with accelerator.accumulate(prepared):
            outputs, penalty = reg.pair(lambda: prepared(**batch, labels=labels))
            accelerator.backward(outputs.loss + penalty)
            optimizer.step()
            optimizer.zero_grad()
        penalties.append(penalty.detach())
    probe.remove()
    assert set(head_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p)) and p > 0 for p in penalties)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert sum(not torch.equal(before[n], p) for n, p in model.named_parameters()) > 0
    reg.remove()


# -- Lightning --------------------------------------------------------------------------------


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.promise("lightning")
def test_lightning_module_with_the_mixin_trains(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    example = _load_example("lightning_example")
    torch.manual_seed(0)
    module = example.LitClassifier(example.TextClassifier(depth=3))
    hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        limit_val_batches=1,
    )
    loader = torch.utils.data.DataLoader(example.synthetic_data(n=24), batch_size=8)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert metrics["rapt/penalty"] > 0
    assert 1 <= metrics["rapt/layer"] <= 3
    assert metrics["rapt/noise_to_hidden_ratio"] > 0
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())
    # teardown("fit") removed the hooks and dropped the regularizer.
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()] == (
        hooks_before
    )
    assert "_rapt_regularizer" not in vars(module)
    assert not any("rapt" in key for key in module.state_dict())


@pytest.mark.promise("lightning")
def test_lightning_mixin_outside_a_module_is_refused() -> None:
    from rapt_reg.integrations.lightning import RaptLightningMixin

    with pytest.raises(rapt_reg.RaptRegError, match="LightningModule"):
        _ = RaptLightningMixin().rapt


# -- transformers Trainer -----------------------------------------------------------------------


class _Dataset(torch.utils.data.Dataset):
    """Rows of a fixed batch, with labels: sequence-level or token-level (-100 on padding)."""

    def __init__(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.rows = [
            {**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(len(labels))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _trainer(tmp_path: Path, name: str, accumulation: int = 1, regularizer=None, **rapt):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from rapt_reg.integrations.transformers import RaptTrainer

    case = CASES[name]
    model, batch = case.build(), case.batch()
    if name == "llama":
        labels = batch["input_ids"].masked_fill(torch.arange(8) >= 6, -100)
    else:
        labels = torch.tensor([0, 1, 2, 0])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    dataset = _Dataset(batch, labels)
    if regularizer is not None:
        rapt["rapt_regularizer"] = regularizer(model)
    trainer = RaptTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, **rapt
    )
    return trainer, dataset


@pytest.mark.promise("trainer-loss")
@pytest.mark.parametrize(("name", "accumulation"), [("bert", 1), ("llama", 2)])
def test_trainer_trains_and_logs_the_penalty(
    tmp_path: Path, accelerator_state: None, name: str, accumulation: int
) -> None:
    trainer, _ = _trainer(tmp_path, name, accumulation, rapt_kwargs={"min_layer": 0})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rapt_penalty" in entry]
    assert len(logged) == 3
    assert all(entry["rapt_penalty"] > 0 for entry in logged)
    assert all(0 <= entry["rapt/layer"] <= 3 for entry in logged)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.promise("trainer-loss")
def test_trainer_loss_is_the_task_loss_plus_the_penalty(
    tmp_path: Path, accelerator_state: None
) -> None:
    """Causal LM: position t counts where labels[t + 1] is trained (the shift), others not."""

    def regularizer(model: nn.Module) -> rapt_reg.RandomPerturbationRegularizer:
        return rapt_reg.RandomPerturbationRegularizer(
            model, min_layer=2, max_layer=2, generator=torch.Generator().manual_seed(5)
        )

    trainer, dataset = _trainer(tmp_path, "llama", regularizer=regularizer)
    model = trainer.model.train()
    inputs = trainer.data_collator([dataset[i] for i in range(4)])
    loss = trainer.compute_loss(model, dict(inputs))
    trainer.rapt.remove()

    labels = inputs["labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100  # logits[t] is judged by labels[t + 1]
    assert not bool(mask.all()) and not torch.equal(mask, labels != -100)
    clean = model(**inputs)
    penalties = {}
    for masked in (True, False):
        with regularizer(model) as check:  # the same layer and noise as the Trainer's step
            penalties[masked] = check(lambda: model(**inputs), clean, mask=mask if masked else None)
    torch.testing.assert_close(loss, clean.loss + penalties[True])
    assert not torch.allclose(penalties[True], penalties[False])


def test_trainer_evaluates_without_noise(tmp_path: Path, accelerator_state: None) -> None:
    trainer, dataset = _trainer(tmp_path, "bert")
    from transformers import Trainer

    plain = Trainer(model=trainer.model, args=trainer.args, eval_dataset=dataset)
    assert trainer.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]


@pytest.mark.promise("with-rapt")
def test_with_rapt_subclasses_any_trainer() -> None:
    transformers = pytest.importorskip("transformers")
    from rapt_reg.integrations import RaptTrainerMixin, with_rapt

    cls = with_rapt(transformers.Seq2SeqTrainer)
    assert issubclass(cls, transformers.Seq2SeqTrainer) and issubclass(cls, RaptTrainerMixin)
    assert cls.__name__ == "RaptSeq2SeqTrainer"
    with pytest.raises(rapt_reg.RaptRegError, match="Trainer subclass"):
        with_rapt(nn.Module)
