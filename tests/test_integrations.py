"""Frameworks around the model: PEFT/LoRA, accelerate, Lightning, the transformers Trainer, and
``import rapt_reg`` with torch alone."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

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
    hooks_before = _hook_objects(module)
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
    assert _same_hooks(_hook_objects(module), hooks_before)
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


def _labels(name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class ids, or for the causal LM the tokens with the last two positions left out."""
    if name == "llama":
        return batch["input_ids"].masked_fill(torch.arange(8) >= 6, -100)
    return torch.tensor([0, 1, 2, 0])


def _trainer(
    tmp_path: Path,
    name: str,
    accumulation: int = 1,
    regularizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    args: Optional[dict[str, Any]] = None,
    **kwargs: Any,
):
    """A RaptTrainer on a tiny model of ``CASES[name]`` and its 4-row batch.

    ``args`` override the TrainingArguments; ``kwargs`` go to the Trainer (``rapt_kwargs``,
    ``callbacks``, ``compute_loss_func``...).
    """
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from rapt_reg.integrations.transformers import RaptTrainer

    case = CASES[name]
    model, batch = case.build().to(dtype), case.batch()
    settings: dict[str, Any] = dict(
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
    settings.update(args or {})
    dataset = _Dataset(batch, _labels(name, batch))
    if regularizer is not None:
        kwargs["rapt_regularizer"] = regularizer(model)
    trainer = RaptTrainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=dataset,
        eval_dataset=dataset,
        **kwargs,
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


def _penalties_of(reg: rapt_reg.RandomPerturbationRegularizer) -> list[torch.Tensor]:
    """The penalties ``reg.pair`` returns from now on, as returned."""
    found: list[torch.Tensor] = []
    pair = reg.pair

    def spy(forward: Any, **kwargs: Any) -> Any:
        outputs, penalty = pair(forward, **kwargs)
        found.append(penalty.detach())
        return outputs, penalty

    reg.pair = spy  # type: ignore[method-assign]
    return found


@pytest.mark.promise("trainer-logged-penalty")
def test_trainer_logs_the_mean_of_the_undivided_penalties(
    tmp_path: Path, accelerator_state: None
) -> None:
    """Accumulation over 2 micro-batches of a causal LM whose loss is normalised over the
    accumulated batch (so the mixin divides the penalty in the loss): the logged value is the
    mean of the two penalties the regularizer returned, not of the divided ones."""
    trainer, _ = _trainer(
        tmp_path, "llama", accumulation=2, regularizer=_seeded(1, 3), args={"max_steps": 1}
    )
    found = _penalties_of(trainer.rapt)
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # the regime where the penalty is divided
    logged = [e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e]
    assert len(found) == 2 and len(logged) == 1
    assert not torch.isclose(found[0], found[1])
    torch.testing.assert_close(torch.tensor(logged[0]), torch.stack(found).mean())


@pytest.mark.promise("neftune-refused")
def test_trainer_refuses_neftune_unless_allowed(tmp_path: Path, accelerator_state: None) -> None:
    """NEFTune is refused with the reason and the opt-in; opted in, it runs: at ``eta=0`` the
    penalty is 0 without NEFTune and positive with it (its noise reaches both passes)."""
    with pytest.raises(
        rapt_reg.RaptRegError,
        match=r"NEFTune \(neftune_noise_alpha=5.0\).*clean pass.*rapt_allow_neftune=True",
    ):
        _trainer(tmp_path, "llama", args={"neftune_noise_alpha": 5.0})
    logged = {}
    for alpha in (None, 5.0):
        trainer, _ = _trainer(
            tmp_path,
            "llama",
            args={"neftune_noise_alpha": alpha, "max_steps": 1},
            rapt_kwargs={"eta": 0.0},
            rapt_allow_neftune=alpha is not None,
        )
        trainer.train()
        logged[alpha] = [
            e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e
        ]
    assert logged[None] == [0.0]
    assert len(logged[5.0]) == 1 and logged[5.0][0] > 0


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


def _hooked(reg: rapt_reg.RandomPerturbationRegularizer) -> bool:
    return any(b._forward_hooks or b._forward_pre_hooks for b in reg.stack.blocks)


def _assert_same_evaluation(found: tuple[Any, Any], expected: tuple[Any, Any]) -> None:
    """``(evaluate(), predict())`` results: the same losses and predictions, bit for bit."""
    assert found[0]["eval_loss"] == expected[0]["eval_loss"]
    assert found[1].metrics["test_loss"] == expected[1].metrics["test_loss"]
    assert (found[1].predictions == expected[1].predictions).all()


@pytest.mark.promise("trainer-eval-no-noise")
@pytest.mark.promise("predict-no-noise")
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_trainer_evaluates_and_predicts_without_noise(
    tmp_path: Path, accelerator_state: None, name: str
) -> None:
    """After a training step (the regularizer built, its hooks in place), ``evaluate()`` and
    ``predict()`` give exactly what the same weights give in a plain ``Trainer``, and in this
    one once the hooks are removed."""
    trainer, dataset = _trainer(tmp_path, name, args={"max_steps": 1}, rapt_kwargs={"min_layer": 0})
    trainer.train()
    reg = trainer.rapt
    assert reg is not None and reg.last_layer is not None and _hooked(reg)
    found = trainer.evaluate(), trainer.predict(dataset)
    assert _hooked(reg)  # still installed: evaluation ran with them

    from transformers import Trainer

    copy = CASES[name].build(seed=1)  # other weights, then the trained ones loaded
    copy.load_state_dict(trainer.model.state_dict())
    plain = Trainer(model=copy, args=trainer.args, eval_dataset=dataset)
    _assert_same_evaluation(found, (plain.evaluate(), plain.predict(dataset)))
    reg.remove()
    _assert_same_evaluation(found, (trainer.evaluate(), trainer.predict(dataset)))
    # The predictions are the logits of a plain eval-mode forward of the same weights.
    inputs = {k: torch.stack([row[k] for row in dataset.rows]) for k in dataset.rows[0]}
    with torch.no_grad():
        direct = logits(copy.eval()(**inputs))
    assert torch.equal(torch.as_tensor(found[1].predictions), direct)


@pytest.mark.promise("with-rapt")
def test_with_rapt_subclasses_any_trainer() -> None:
    transformers = pytest.importorskip("transformers")
    from rapt_reg.integrations import RaptTrainerMixin, with_rapt

    cls = with_rapt(transformers.Seq2SeqTrainer)
    assert issubclass(cls, transformers.Seq2SeqTrainer) and issubclass(cls, RaptTrainerMixin)
    assert cls.__name__ == "RaptSeq2SeqTrainer"
    with pytest.raises(rapt_reg.RaptRegError, match="Trainer subclass"):
        with_rapt(nn.Module)


# -- the Trainer's promises, each against a written-out reference ------------------------------

NO_CLIPPING = {"max_grad_norm": 0.0, "max_steps": 1}


def _gradient_recorder() -> Any:
    """A callback keeping the gradients the optimizer is about to use (after any clipping)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }

    return Recorder()


class _NoiseByExample:
    """The regularizer's noise, drawn for real once and then replayed example by example.

    RAPT draws a layer and a noise seed per call, so a run with 2 micro-batches and a run with
    the whole batch at once would perturb each example differently and their gradients could
    not be compared exactly. The layer is fixed by ``min_layer == max_layer``; the noise is
    recorded per example (keyed by its ``input_ids``) while ``record`` is True and handed back
    to the same example afterwards, whatever batch it lands in. The per-example scaling (inf
    norm over each example's real tokens) makes each row's noise depend on that example only,
    so the replayed noise is what the sampler would give had it drawn those rows.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import rapt_reg.regularizer

        self.rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.record = True
        self._ids: list[torch.Tensor] = []
        self._sample = rapt_reg.regularizer.sample_noise
        monkeypatch.setattr(rapt_reg.regularizer, "sample_noise", self.sample)

    def watch(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(
            lambda m, args, kwargs: self._ids.append(kwargs["input_ids"]), with_kwargs=True
        )

    def sample(self, shape: torch.Size, **kwargs: Any) -> torch.Tensor:
        keys = [tuple(row.tolist()) for row in self._ids[-1]]
        assert kwargs["batch_dim"] == 0 and shape[0] == len(keys)
        if self.record:
            noise = self._sample(shape, **kwargs)
            self.rows.update(zip(keys, noise))
            return noise
        return torch.stack([self.rows[key] for key in keys])


def _summed_cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch=None):
    """A ``compute_loss_func`` normalised over the accumulated batch, as the Trainer expects."""
    loss = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    return loss / num_items_in_batch


def _one_step_grads(
    tmp_path: Path, noise: _NoiseByExample, loss: str, accumulation: int, **args: Any
) -> tuple[dict[str, torch.Tensor], Any]:
    """The gradients of one optimizer step of a float64 RaptTrainer (dropout off)."""
    recorder = _gradient_recorder()
    kwargs: dict[str, Any] = {}
    if loss == "compute-loss-func":
        kwargs["compute_loss_func"] = _summed_cross_entropy
    trainer, _ = _trainer(
        tmp_path,
        "llama" if loss == "model-loss" else "bert",
        accumulation,
        dtype=torch.float64,
        args={**NO_CLIPPING, **args},
        callbacks=[recorder],
        rapt_kwargs={"min_layer": 2, "max_layer": 2},
        **kwargs,
    )
    if loss == "trainer-divides":
        # A model whose forward takes no loss kwargs: the Trainer divides the whole loss
        # (task + penalty) by the accumulation steps itself, so the mixin must not.
        trainer.model_accepts_loss_kwargs = False
    noise.watch(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 1
    penalties = [e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e]
    assert len(penalties) == 1 and penalties[0] > 0
    return recorder.grads, trainer


def _assert_same_grads(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, rtol=1e-9, atol=1e-12 * scale, msg=name)


@pytest.mark.promise("trainer-grad-accumulation")
@pytest.mark.parametrize("loss", ["model-loss", "trainer-divides", "compute-loss-func"])
def test_trainer_accumulation_gives_the_gradients_of_the_whole_batch(
    tmp_path: Path, accelerator_state: None, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """2 micro-batches of 2 == 1 batch of 4, to float64 rounding, whoever scales the loss.

    ``model-loss``: a causal LM normalising its loss over the accumulated batch's tokens (the
    Trainer leaves it alone; the mixin divides the penalty by the steps); ``trainer-divides``:
    the Trainer divides task loss and penalty; ``compute-loss-func``: a user loss normalised
    over the accumulated batch (the mixin divides the penalty). Each micro-batch holds as
    many trained positions, so the mean of the micro-batches' penalties is the whole batch's.
    """
    noise = _NoiseByExample(monkeypatch)
    micro, _ = _one_step_grads(tmp_path, noise, loss, accumulation=2)
    noise.record = False
    whole, _ = _one_step_grads(tmp_path, noise, loss, accumulation=1)
    _assert_same_grads(micro, whole)


@pytest.mark.promise("grad-clipping-accumulation")
def test_trainer_clips_the_accumulated_gradient(
    tmp_path: Path, accelerator_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_grad_norm`` with accumulation: the whole batch's gradient, penalty included,
    scaled to norm ``max_grad_norm`` (written out as torch's rule: ``c / (norm + 1e-6)``)."""
    noise = _NoiseByExample(monkeypatch)
    _one_step_grads(tmp_path, noise, "model-loss", accumulation=2)  # records the noise
    noise.record = False
    whole, _ = _one_step_grads(tmp_path, noise, "model-loss", accumulation=1)
    norm = torch.cat([g.flatten() for g in whole.values()]).norm().item()
    max_norm = norm / 3
    clipped, _ = _one_step_grads(
        tmp_path, noise, "model-loss", accumulation=2, max_grad_norm=max_norm
    )
    coefficient = max_norm / (norm + 1e-6)
    _assert_same_grads(clipped, {n: g * coefficient for n, g in whole.items()})


def _hook_objects(model: nn.Module) -> dict[str, dict[str, dict[int, Any]]]:
    """Every hook dict of every module, holding the hook objects themselves."""
    return {
        name: {
            key: dict(value)
            for key, value in vars(module).items()
            if "hooks" in key and isinstance(value, dict)
        }
        for name, module in model.named_modules()
    }


def _same_hooks(found: dict, expected: dict) -> bool:
    return found.keys() == expected.keys() and all(
        found[m].keys() == expected[m].keys()
        and all(
            found[m][k].keys() == expected[m][k].keys()
            and all(found[m][k][i] is hook for i, hook in expected[m][k].items())
            for k in expected[m]
        )
        for m in expected
    )


@pytest.mark.promise("seq2seq-trainer")
def test_with_rapt_seq2seq_trainer_trains_one_step(tmp_path: Path, accelerator_state: None) -> None:
    """``with_rapt(Seq2SeqTrainer)`` on a tiny T5 (float64): the gradients of its step are
    those of the task loss plus a penalty written out by hand (the same seeded regularizer,
    the noisy pass fed ``decoder_input_ids`` shifted from the labels, -100 positions out,
    padding without noise); the step changes the weights; ``remove()`` leaves no hook."""
    transformers = pytest.importorskip("transformers")
    import copy

    from rapt_reg.integrations import with_rapt

    case = CASES["t5"]
    model = case.build().double()
    reference = copy.deepcopy(model)
    hooks = _hook_objects(model)
    batch = {k: v for k, v in case.batch().items() if k != "decoder_input_ids"}
    labels = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(0))
    labels[0, -2:] = -100
    dataset = _Dataset(batch, labels)
    recorder = _gradient_recorder()
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    rapt = {"min_layer": 0, "max_layer": 3}
    trainer = with_rapt(transformers.Seq2SeqTrainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[recorder],
        rapt_kwargs={**rapt, "generator": torch.Generator().manual_seed(7)},
    )
    calls: list[dict[str, Any]] = []  # the batch as the Trainer fed it (shuffled)
    seen = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    trainer.train()
    seen.remove()
    logged = [e["rapt_penalty"] for e in trainer.state.log_history if "rapt_penalty" in e]
    assert len(logged) == 1 and logged[0] > 0

    inputs = {k: calls[0][k] for k in ("input_ids", "attention_mask", "labels")}
    labels = inputs["labels"]
    noisy_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    noisy_inputs["decoder_input_ids"] = reference._shift_right(labels)
    with rapt_reg.RandomPerturbationRegularizer(
        reference, **rapt, generator=torch.Generator().manual_seed(7)
    ) as reg:
        clean = reference(**inputs)
        penalty = reg(
            lambda: reference(**noisy_inputs),
            clean,
            mask=labels != -100,
            noise_mask=inputs["attention_mask"].bool(),
        )
        (clean.loss + penalty).backward()
    assert trainer.rapt.last_layer == reg.last_layer
    torch.testing.assert_close(torch.tensor(logged[0], dtype=torch.float64), penalty.detach())
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    _assert_same_grads(recorder.grads, expected)

    changed = [
        n for n, p in model.named_parameters() if not torch.equal(p, reference.get_parameter(n))
    ]
    assert len(changed) > len(expected) // 2
    assert not _same_hooks(_hook_objects(model), hooks)  # the regularizer's hooks are in
    trainer.rapt.remove()
    assert _same_hooks(_hook_objects(model), hooks)


def _seeded(min_layer: int, max_layer: int, seed: int = 3) -> Any:
    """``model -> regularizer`` drawing the same layers and noise every time it is called."""

    def build(model: nn.Module) -> rapt_reg.RandomPerturbationRegularizer:
        return rapt_reg.RandomPerturbationRegularizer(
            model,
            min_layer=min_layer,
            max_layer=max_layer,
            generator=torch.Generator().manual_seed(seed),
        )

    return build


def _squared_error_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch=None):
    """A ``compute_loss_func``: squared error of the logits to one-hot labels."""
    one_hot = torch.nn.functional.one_hot(labels, outputs.logits.shape[-1])
    return (outputs.logits - one_hot).square().mean()


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param("label-smoothing", marks=pytest.mark.promise("trainer-label-smoothing")),
        pytest.param("compute-loss-func", marks=pytest.mark.promise("compute-loss-func")),
    ],
)
def test_trainer_clean_pass_is_the_parents_loss(
    tmp_path: Path, accelerator_state: None, loss: str
) -> None:
    """The clean pass is the parent's ``compute_loss``: with ``label_smoothing_factor`` or a
    ``compute_loss_func`` the loss is that loss (written out here) plus the penalty."""
    regularizer = _seeded(0, 3)
    if loss == "label-smoothing":
        trainer, dataset = _trainer(
            tmp_path, "bert", regularizer=regularizer, args={"label_smoothing_factor": 0.2}
        )
    else:
        trainer, dataset = _trainer(
            tmp_path, "bert", regularizer=regularizer, compute_loss_func=_squared_error_loss
        )
    model = trainer.model.train()
    inputs = trainer.data_collator([dataset[i] for i in range(4)])
    found = trainer.compute_loss(model, dict(inputs))
    trainer.rapt.remove()

    labels = inputs["labels"]
    features = {k: v for k, v in inputs.items() if k != "labels"}
    clean = model(**features)
    plain = torch.nn.functional.cross_entropy(clean.logits, labels)
    if loss == "label-smoothing":  # (1 - e) * NLL + e * mean over classes of -log p
        log_p = clean.logits.log_softmax(-1)
        nll = -log_p.gather(1, labels[:, None]).mean()
        task = 0.8 * nll + 0.2 * (-log_p.mean(-1)).mean()
    else:
        one_hot = torch.nn.functional.one_hot(labels, 3)
        task = (clean.logits - one_hot).square().mean()
    assert not torch.allclose(task, plain)
    with regularizer(model) as check:  # the same layer and noise as the Trainer's
        penalty = check(
            lambda: model(**features), clean, noise_mask=inputs["attention_mask"].bool()
        )
    assert penalty > 0
    torch.testing.assert_close(found, task + penalty)


@pytest.mark.promise("padding-excluded")
def test_trainer_penalty_leaves_out_untrained_positions_and_padding_gets_no_noise(
    tmp_path: Path, accelerator_state: None
) -> None:
    """Causal LM with a prompt (-100) and right padding (attention 0, -100): the penalty is the
    symmetric KL written out by hand, averaged over the positions whose *next* label is
    trained (not over the attention mask's), and the padding's hidden states get no noise."""
    trainer, _ = _trainer(tmp_path, "llama", regularizer=_seeded(0, 0))
    model = trainer.model.train()
    ids = CASES["llama"].batch()["input_ids"]
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    attention[2, -1:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :3] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    outputs: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, args, out: outputs.append(out.logits))
    first_block: list[torch.Tensor] = []  # the hidden states entering it, noise included
    trainer.rapt.stack.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: first_block.append(
            (args[0] if args else kwargs["hidden_states"]).detach()
        ),
        with_kwargs=True,
    )
    loss = trainer.compute_loss(model, dict(batch))

    clean, noisy = outputs
    counted = torch.zeros_like(attention, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    log_p, log_q = noisy.log_softmax(-1), clean.log_softmax(-1)
    sym_kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
    task = torch.nn.functional.cross_entropy(
        clean[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, task + sym_kl[counted].mean())
    assert not torch.allclose(sym_kl[attention.bool()].mean(), sym_kl[counted].mean())
    delta = first_block[1] - first_block[0]
    assert bool((delta[attention == 0] == 0).all()) and bool((delta[attention == 1] != 0).all())


@pytest.mark.promise("model-init")
def test_trainer_with_model_init_builds_the_regularizer_on_each_model(
    tmp_path: Path, accelerator_state: None
) -> None:
    """``model_init``: the regularizer is built on the model the Trainer made, at its first
    training step; a new ``train()`` makes a new model, and the regularizer follows it,
    taking its hooks off the old one."""
    from transformers import TrainingArguments

    from rapt_reg.integrations.transformers import RaptTrainer

    case = CASES["bert"]
    models: list[nn.Module] = []
    pristine: list[dict] = []

    def model_init() -> nn.Module:
        models.append(case.build(seed=len(models)))
        pristine.append(_hook_objects(models[-1]))
        return models[-1]

    batch = case.batch()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RaptTrainer(
        model_init=model_init,
        args=args,
        train_dataset=_Dataset(batch, _labels("bert", batch)),
        rapt_kwargs={"min_layer": 0},
    )
    regularizers = []
    for _ in range(2):
        trainer.train()
        reg = trainer.rapt
        assert reg is not None and reg.model is models[-1] and trainer.model is models[-1]
        assert set(reg.stack.blocks) <= set(models[-1].modules()) and _hooked(reg)
        logged = [e for e in trainer.state.log_history if "rapt_penalty" in e]
        assert logged[-1]["rapt_penalty"] > 0
        regularizers.append(reg)
    assert len(models) == 3 and regularizers[0] is not regularizers[1]
    assert _same_hooks(_hook_objects(models[1]), pristine[1])  # the old model: hooks gone
    regularizers[1].remove()
    assert _same_hooks(_hook_objects(models[2]), pristine[2])


def _models_given_to_compute_loss(trainer: Any) -> list[nn.Module]:
    ran: list[nn.Module] = []
    compute_loss = trainer.compute_loss

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ran.append(model)
        return compute_loss(model, *args, **kwargs)

    trainer.compute_loss = spy
    return ran


@pytest.mark.promise("torch-compile")
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_trainer_with_torch_compile_gets_the_noise(
    tmp_path: Path, accelerator_state: None, backend: str
) -> None:
    """``torch_compile=True``: the compiled model runs the noisy pass with the noise in (the
    regularizer refuses a pass the noise did not reach), and a step's penalty and gradients are
    those of the same step without compiling (same seeds), to compiler rounding. Slow: tracing
    takes about 15 s here with ``aot_eager`` (the same graphs, hooks included, without
    generating code) and over a minute with the default backend, inductor."""
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    found = {}
    for compiled in (False, True):
        recorder = _gradient_recorder()
        trainer, _ = _trainer(
            tmp_path,
            "bert",
            # (naming a backend turns torch_compile on, so only the compiled run names it)
            args={**NO_CLIPPING, **({"torch_compile_backend": backend} if compiled else {})},
            callbacks=[recorder],
            rapt_kwargs={
                "min_layer": 1,
                "max_layer": 3,
                "generator": torch.Generator().manual_seed(5),
            },
        )
        ran = _models_given_to_compute_loss(trainer)
        trainer.train()
        assert [isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in ran] == [compiled]
        logged = [e for e in trainer.state.log_history if "rapt_penalty" in e]
        assert len(logged) == 1 and logged[0]["rapt_penalty"] > 0
        found[compiled] = logged[0]["rapt_penalty"], recorder.grads, trainer.rapt.last_layer
        assert trainer.args.torch_compile is compiled
        trainer.rapt.remove()
    torch._dynamo.reset()
    assert found[True][2] == found[False][2]
    assert found[True][0] == pytest.approx(found[False][0], rel=1e-4)
    eager = found[False][1]
    scale = max(g.abs().max().item() for g in eager.values())
    assert found[True][1].keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(found[True][1][name], grad, rtol=1e-3, atol=1e-5 * scale)
