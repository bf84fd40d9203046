"""Reading labelled text, checking it, splitting it per seed, and perturbing it.

Nothing here imports torch or transformers, so the readers, the checks and the perturbations
can be tested on their own. Every problem with the data is a :class:`~rapt_reg.RaptRegError`
that names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rapt_reg.errors import RaptRegError

__all__ = [
    "PERTURBATIONS",
    "TABLE_SUFFIXES",
    "TextCorpus",
    "check_training_classes",
    "digest",
    "few_shot_split",
    "fraction_split",
    "perturb_text",
    "perturb_texts",
    "read_corpus",
    "read_folder",
    "read_table",
]

#: Kinds of test-time text perturbation that :func:`perturb_text` knows.
PERTURBATIONS = ("typos", "word-dropout")

#: File name endings read as tables, and how: a CSV/TSV delimiter, or ``"jsonl"``.
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class TextCorpus:
    """A labelled text corpus.

    Attributes:
        texts: One string per document, whitespace collapsed to single spaces.
        labels: Class name of each document, as written in the data.
        sources: Where each document was read from: ``"file:line"`` for a table,
            ``"class/file.txt"`` for a folder.
        origin: The file or folder read.
    """

    texts: list[str]
    labels: list[str]
    sources: list[str]
    origin: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def class_names(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted(set(self.labels))


def _decode(raw: bytes, where: str, encoding: str, fallback: Optional[str] = None) -> str:
    try:
        return raw.decode(encoding)
    except LookupError:
        raise RaptRegError(
            f"unknown encoding {encoding!r}; pass a Python codec name to --encoding, "
            "e.g. utf-8, cp1252, latin-1"
        ) from None
    except UnicodeDecodeError as error:
        if fallback is not None:
            return raw.decode(fallback, errors="replace")
        line = raw.count(b"\n", 0, error.start) + 1
        raise RaptRegError(
            f"{where}: line {line} is not valid {encoding} (byte {error.start}: "
            f"{raw[error.start : error.start + 1]!r}); if the file uses another encoding, "
            "pass it with --encoding, e.g. --encoding cp1252"
        ) from None


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_table(
    path: Path, text_column: str = "text", label_column: str = "label", encoding: str = "utf-8"
) -> TextCorpus:
    """Read a CSV, TSV or JSON Lines file with a text column and a label column.

    The kind is taken from the file name's ending (:data:`TABLE_SUFFIXES`). CSV and TSV files
    need a header line; JSON Lines files hold one object per line (blank lines are skipped).
    Labels may be strings or numbers; they are compared as strings.

    Args:
        path: The file.
        text_column: Name of the column (or key) holding the text.
        label_column: Name of the column (or key) holding the label.
        encoding: How the file is encoded.

    Returns:
        The corpus, in file order; ``sources`` are ``"file:line"``.

    Raises:
        RaptRegError: If the file is missing or not valid in ``encoding``, a column is
            missing, a line is not a JSON object, or a text or label is empty; the message
            names the file and line.
    """
    path = Path(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise RaptRegError(
            f"{path}: unknown file type {path.suffix!r}; use one of "
            f"{', '.join(TABLE_SUFFIXES)} or a folder with one sub-folder of .txt files per class"
        )
    if not path.is_file():
        raise RaptRegError(f"{path}: no such file")
    text = _decode(path.read_bytes(), str(path), encoding)
    rows = _json_lines(path, text) if kind == "jsonl" else _delimited(path, text, kind)
    texts: list[str] = []
    labels: list[str] = []
    sources: list[str] = []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                flag = "--text-column" if column == text_column else "--label-column"
                raise RaptRegError(
                    f"{path}: line {line} has no column {column!r} (it has: "
                    f"{', '.join(map(repr, row)) or 'none'}); name the right one with {flag}"
                )
        value, label = row[text_column], row[label_column]
        value = "" if value is None else _clean(str(value))
        label = "" if label is None else str(label).strip()
        if not value:
            raise RaptRegError(f"{path}: line {line}: the text ({text_column!r}) is empty")
        if not label:
            raise RaptRegError(f"{path}: line {line}: the label ({label_column!r}) is empty")
        texts.append(value)
        labels.append(label)
        sources.append(f"{path.name}:{line}")
    if not texts:
        raise RaptRegError(f"{path}: no examples")
    return TextCorpus(texts, labels, sources, str(path))


def _delimited(path: Path, text: str, delimiter: str) -> list[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise RaptRegError(f"{path}: no header line (a first line naming the columns)")
    rows = []
    start = 2  # the line a row starts on; the header is line 1
    for row in reader:
        if None in row:
            raise RaptRegError(
                f"{path}: line {start} has more fields than the header's {len(reader.fieldnames)}"
            )
        present = {k: v for k, v in row.items() if v is not None}
        if any((v or "").strip() for v in present.values()):
            rows.append((start, present))
        start = reader.line_num + 1
    return rows


def _json_lines(path: Path, text: str) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RaptRegError(f"{path}: line {line} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise RaptRegError(f"{path}: line {line} is not a JSON object")
        rows.append((line, row))
    return rows


def read_folder(
    root: Path, encoding: str = "utf-8", fallback_encoding: Optional[str] = None
) -> TextCorpus:
    """Read a folder holding one sub-folder of ``.txt`` files per class.

    Class folders and the files in them are read in sorted order; the folder name is the label.
    Folders whose name starts with ``_`` or ``.`` are skipped.

    Args:
        root: The folder.
        encoding: How the files are encoded.
        fallback_encoding: Decode a file that is not valid in ``encoding`` with this one
            instead of refusing it (BBC News has a few Windows-1252 files among UTF-8 ones).

    Returns:
        The corpus; ``sources`` are ``"class/file.txt"``.

    Raises:
        RaptRegError: If the folder has no class folders with ``.txt`` files, or a file is
            empty or not valid in ``encoding``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RaptRegError(f"{root}: no such folder")
    class_dirs = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )
    texts: list[str] = []
    labels: list[str] = []
    sources: list[str] = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.glob("*.txt")):
            text = _clean(_decode(path.read_bytes(), str(path), encoding, fallback_encoding))
            if not text:
                raise RaptRegError(f"{path}: the file is empty")
            texts.append(text)
            labels.append(class_dir.name)
            sources.append(f"{class_dir.name}/{path.name}")
    if not texts:
        raise RaptRegError(
            f"{root}: no examples; a data folder needs one sub-folder of .txt files per class"
        )
    return TextCorpus(texts, labels, sources, str(root))


def read_corpus(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    fallback_encoding: Optional[str] = None,
) -> TextCorpus:
    """Read a table (:func:`read_table`) or a folder (:func:`read_folder`), by what ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, encoding, fallback_encoding)
    return read_table(path, text_column, label_column, encoding)


def digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's ``.txt`` files and their names: the data's identity."""
    path = Path(path)
    sha = hashlib.sha256()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()


def check_training_classes(train: TextCorpus, test: Optional[TextCorpus] = None) -> None:
    """Refuse data a classifier cannot be compared on.

    Args:
        train: The training data (or all the data, when there is no test file).
        test: The test file's data, if any.

    Raises:
        RaptRegError: If the training data has one class only, or the test data has a label
            the training data never has (naming its file and line).
    """
    classes = train.class_names
    if len(classes) < 2:
        raise RaptRegError(
            f"{train.origin}: every example has the label {classes[0]!r}; a classifier needs "
            "at least two classes (check --label-column)"
        )
    if test is not None:
        known = set(classes)
        for label, source in zip(test.labels, test.sources):
            if label not in known:
                raise RaptRegError(
                    f"{test.origin}: line {source.rsplit(':', 1)[-1]} has the label {label!r}, "
                    f"which the training data {train.origin} never has (it has: "
                    f"{', '.join(map(repr, classes))})"
                )


def few_shot_split(
    labels: Sequence[object],
    per_class: int,
    seed: int,
    eval_size: Optional[int] = None,
    *,
    keep_rest: bool = True,
) -> tuple[list[int], list[int]]:
    """Split indices into a small balanced training set and a held-out set.

    Args:
        labels: Class of each example.
        per_class: How many training examples to draw from each class.
        seed: Seed of the draw; the same seed gives the same split.
        eval_size: If given, keep only this many held-out examples, drawn at random (seeded)
            from all that are left; ``None`` keeps them all.
        keep_rest: With ``False`` a class may give all its examples to training (used when
            the held-out examples come from a separate test file).

    Returns:
        ``(train_indices, heldout_indices)``, each sorted, disjoint.

    Raises:
        RaptRegError: If a class has too few examples for ``per_class``, or a size is not
            positive.
    """
    if per_class < 1:
        raise RaptRegError(f"per_class must be at least 1, got {per_class}")
    if eval_size is not None and eval_size < 1:
        raise RaptRegError(f"eval_size must be at least 1 or None, got {eval_size}")
    rng = random.Random(seed)
    train: list[int] = []
    for cls in sorted(set(map(str, labels))):
        members = [i for i, label in enumerate(labels) if str(label) == cls]
        if len(members) < per_class or (keep_rest and len(members) == per_class):
            raise RaptRegError(
                f"class {cls!r} has {len(members)} examples; --train-per-class {per_class} "
                f"needs {per_class + int(keep_rest)} or more (lower --train-per-class)"
            )
        train.extend(rng.sample(members, per_class))
    chosen = set(train)
    heldout = [i for i in range(len(labels)) if i not in chosen]
    if eval_size is not None and eval_size < len(heldout):
        heldout = rng.sample(heldout, eval_size)
    return sorted(train), sorted(heldout)


def fraction_split(
    labels: Sequence[object], test_fraction: float, seed: int, eval_size: Optional[int] = None
) -> tuple[list[int], list[int]]:
    """Split indices into training and held-out sets, stratified by class.

    Each class gives ``round(test_fraction * size)`` of its examples to the held-out set, at
    least one, and keeps at least one for training.

    Args:
        labels: Class of each example.
        test_fraction: Share of each class held out, in ``(0, 1)``.
        seed: Seed of the draw.
        eval_size: If given, keep only this many held-out examples (seeded draw).

    Returns:
        ``(train_indices, heldout_indices)``, each sorted, disjoint.

    Raises:
        RaptRegError: If ``test_fraction`` is outside ``(0, 1)`` or a class has fewer than two
            examples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise RaptRegError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    heldout: list[int] = []
    for cls, count in sorted(Counter(map(str, labels)).items()):
        if count < 2:
            raise RaptRegError(
                f"class {cls!r} has a single example; it cannot be both trained on and held out"
            )
        members = [i for i, label in enumerate(labels) if str(label) == cls]
        take = min(count - 1, max(1, round(test_fraction * count)))
        heldout.extend(rng.sample(members, take))
    chosen = set(heldout)
    train = [i for i in range(len(labels)) if i not in chosen]
    if eval_size is not None and eval_size < len(heldout):
        heldout = rng.sample(heldout, eval_size)
    return train, sorted(heldout)


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
