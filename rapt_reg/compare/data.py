"""Reading labelled text, checking it, splitting it per seed, and perturbing it.

Nothing here imports torch or transformers, so the readers, the checks and the perturbations
can be tested on their own. Every problem with the data is a :class:`~rapt_reg.RaptRegError`
in one line that names the file and, where there is one, the line and column, and says what
to do about it.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import math
import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rapt_reg.errors import RaptRegError

__all__ = [
    "MAX_FIELD_CHARS",
    "MISSING_LABELS",
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

#: Largest CSV/TSV field read, in characters (16 Mi); a larger one is refused. Python's csv
#: module stops at 131,072 by default, which a long document can pass.
MAX_FIELD_CHARS = 16 * 1024 * 1024

#: Label spellings that mean "missing" (pandas, R, JSON, Python), compared without case.
MISSING_LABELS = frozenset({"nan", "-nan", "null", "none", "na", "n/a", "#n/a", "<na>"})

#: File names a data folder may hold besides its class folders, skipped without a word.
_SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class TextCorpus:
    """A labelled text corpus.

    Attributes:
        texts: One string per document, whitespace collapsed to single spaces.
        labels: Class name of each document, as written in the data.
        sources: Where each document was read from: ``"file:line"`` for a table,
            ``"class/file.txt"`` for a folder.
        origin: The file or folder read.
        skipped: Files of a folder that were not read (not ``.txt``, or not in a class
            folder), relative to the folder; empty for a table.
    """

    texts: list[str]
    labels: list[str]
    sources: list[str]
    origin: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def class_names(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted(set(self.labels))


def _decode(raw: bytes, where: str, encoding: str, fallback: Optional[str] = None) -> str:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise RaptRegError(
            f"unknown encoding {encoding!r}; pass a Python codec name to --encoding, "
            "e.g. utf-8, cp1252, latin-1"
        ) from None
    try:
        # A UTF-8 byte-order mark (Excel writes one) is not part of the text.
        return raw.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as error:
        if fallback is not None:
            return raw.decode(fallback, errors="replace")
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise RaptRegError(
            f"{where}: line {line}, byte {column} of the line is not valid {encoding} "
            f"({raw[error.start : error.start + 1]!r}); if the file uses another encoding, "
            "pass it with --encoding, e.g. --encoding cp1252"
        ) from None


def _clean(text: str) -> str:
    return " ".join(text.split())


def _missing_path(path: Path, flag: str) -> RaptRegError:
    # A path that is neither a file nor a folder: say so, and suggest a near name beside it.
    parent = path.parent if path.parent.is_dir() else None
    near = []
    if parent is not None:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
        near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {parent / near[0] if parent else near[0]}?" if near else ""
    where = "" if parent is not None else f" (and {path.parent} is not a folder either)"
    return RaptRegError(f"{flag} {path}: no such file or folder{where}{hint}")


def read_table(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    flag: str = "--data",
) -> TextCorpus:
    """Read a CSV, TSV or JSON Lines file with a text column and a label column.

    The kind is taken from the file name's ending (:data:`TABLE_SUFFIXES`). CSV and TSV files
    need a header line; JSON Lines files hold one object per line (blank lines are skipped).
    Labels may be strings, integers, floats or booleans and are compared as written; a
    UTF-8 byte-order mark is skipped.

    Args:
        path: The file.
        text_column: Name of the column (or key) holding the text.
        label_column: Name of the column (or key) holding the label.
        encoding: How the file is encoded.
        flag: The option that named the file, for messages.

    Returns:
        The corpus, in file order; ``sources`` are ``"file:line"``.

    Raises:
        RaptRegError: If the file is missing or not valid in ``encoding``; a quote is never
            closed or a quoted field runs on; a field is longer than :data:`MAX_FIELD_CHARS`;
            the header repeats the text or label column; a row lacks a column or has extra
            fields; a line is not a JSON object or repeats a key; a text is empty or not
            text; a label is empty, a missing value (:data:`MISSING_LABELS`, JSON null, NaN),
            a list or a mapping; or one number is written two ways as labels (``1`` and
            ``1.0``). The message names the file, the line and the column.
    """
    path = Path(path)
    if not path.exists():
        raise _missing_path(path, flag)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if path.is_dir() or kind is None:
        raise RaptRegError(
            f"{flag} {path}: unknown file type {path.suffix!r}; use one of "
            f"{', '.join(TABLE_SUFFIXES)} or a folder with one sub-folder of .txt files per class"
        )
    text = _decode(path.read_bytes(), str(path), encoding)
    if kind == "jsonl":
        rows = _json_lines(path, text, (text_column, label_column))
    else:
        rows = _delimited(path, text, kind, text_column, label_column)
    texts: list[str] = []
    labels: list[str] = []
    sources: list[str] = []
    spelled: dict[float, tuple[str, int]] = {}
    for line, row in rows:
        value = _text(row[text_column], path, line, text_column)
        label = _label(row[label_column], path, line, label_column)
        number = _as_number(label)
        if number is not None:
            first, first_line = spelled.setdefault(number, (label, line))
            if first != label:
                raise RaptRegError(
                    f"{path}: line {line}, column {label_column!r}: the label {label!r} is the "
                    f"number of line {first_line}'s label {first!r}, written another way; they "
                    "would be two classes: write every label of a class the same way"
                )
        texts.append(value)
        labels.append(label)
        sources.append(f"{path.name}:{line}")
    if not texts:
        raise RaptRegError(f"{path}: no examples (only a header or blank lines)")
    return TextCorpus(texts, labels, sources, str(path))


def _text(value: Any, path: Path, line: int, column: str) -> str:
    where = f"{path}: line {line}, column {column!r}"
    if value is None or isinstance(value, (list, dict)) or _is_nan(value):
        shown = "null" if value is None else "NaN" if _is_nan(value) else type(value).__name__
        raise RaptRegError(f"{where}: the text is {shown}, not a text; give every row a text")
    text = _clean(str(value))
    if not text:
        raise RaptRegError(f"{where}: the text is empty; give every row a text or drop the row")
    return text


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _label(value: Any, path: Path, line: int, column: str) -> str:
    # A label as the class name it is, or a refusal of what is not one.
    where = f"{path}: line {line}, column {column!r}"
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "mapping"
        raise RaptRegError(
            f"{where}: the label is a {kind} ({json.dumps(value)[:40]}); rapt-reg compare needs "
            "one class per example (for several labels per example, keep one)"
        )
    if value is None or _is_nan(value):
        shown = "null" if value is None else repr(value)
        raise RaptRegError(
            f"{where}: the label is {shown}, a missing value; label the row or drop it"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    label = str(value).strip()
    if not label:
        raise RaptRegError(f"{where}: the label is empty; label the row or drop it")
    if label.lower() in MISSING_LABELS:
        raise RaptRegError(
            f"{where}: the label {label!r} is how pandas, R or JSON write a missing value, not a "
            "class; label the row or drop it (if it is a class of yours, rename it in the file)"
        )
    if label[0] + label[-1] in ("[]", "{}"):
        raise RaptRegError(
            f"{where}: the label {label!r} is a list written as text; rapt-reg compare needs one "
            "class per example (for several labels per example, keep one)"
        )
    return label


def _as_number(label: str) -> Optional[float]:
    try:
        number = float(label)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _delimited(
    path: Path, text: str, delimiter: str, text_column: str, label_column: str
) -> list[tuple[int, dict[str, str]]]:
    old_limit = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        records: list[tuple[int, list[str]]] = []
        start = 1  # the line the next record starts on
        try:
            for record in reader:
                records.append((start, record))
                start = reader.line_num + 1
        except csv.Error as error:
            header = records[0][1] if records else None
            raise _csv_problem(path, text, delimiter, start, header, str(error)) from None
    finally:
        csv.field_size_limit(old_limit)
    if not records or not any(field.strip() for field in records[0][1]):
        raise RaptRegError(f"{path}: line 1: no header line (a first line naming the columns)")
    header = records[0][1]
    positions = {}
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        found = [i for i, name in enumerate(header) if name == column]
        if not found:
            near = difflib.get_close_matches(column, header, n=1, cutoff=0.6)
            hint = f" ({near[0]!r} is close)" if near else ""
            raise RaptRegError(
                f"{path}: line 1: the header has no column {column!r} (it has: "
                f"{', '.join(map(repr, header))}){hint}; name the right one with {flag}"
            )
        if len(found) > 1:
            raise RaptRegError(
                f"{path}: line 1: the header names {column!r} twice (columns "
                f"{' and '.join(str(i + 1) for i in found)}); rename one of them in the file"
            )
        positions[column] = found[0]
    label_at = positions[label_column]
    labels = {r[label_at].strip() for _, r in records[1:] if label_at < len(r)} - {""}
    rows = []
    for line, record in records[1:]:
        if not any(field.strip() for field in record):
            continue  # a blank line, or one of empty fields (",,") as spreadsheets write
        _check_runaway(path, line, record, header, delimiter, labels, label_at)
        if len(record) > len(header):
            raise RaptRegError(
                f"{path}: line {line} has {len(record)} fields, the header {len(header)}; quote "
                f'a field that holds the delimiter {delimiter!r} ("like, this")'
            )
        short = [c for c, i in positions.items() if i >= len(record)]
        if short:
            raise RaptRegError(
                f"{path}: line {line} has {len(record)} field{'s' * (len(record) != 1)}, the "
                f"header {len(header)}: no value for column {short[0]!r}; complete the row"
            )
        rows.append((line, {c: record[i] for c, i in positions.items()}))
    return rows


def _check_runaway(
    path: Path,
    line: int,
    record: list[str],
    header: list[str],
    delimiter: str,
    labels: set[str],
    label_at: int,
) -> None:
    """Refuse a quoted field that holds whole rows: a line of it with as many fields as the
    header and a label of the file in the label column. A quote that is not closed where it
    should be swallows the rows after it, up to the next quote."""
    for number, value in enumerate(record):
        if "\n" not in value:
            continue
        for offset, part in enumerate(value.split("\n")[1:], start=1):
            fields = next(csv.reader([part.rstrip("\r")], delimiter=delimiter), [])
            if len(fields) == len(header) and fields[label_at].strip() in labels:
                name = f" {header[number]!r}" if number < len(header) else ""
                raise RaptRegError(
                    f"{path}: line {line}, column {number + 1}{name}: a quoted field runs on "
                    f"over {value.count(chr(10)) + 1} lines, and its line {line + offset} reads "
                    f"like a row ({part.strip()[-40:]!r}); a quote is probably not closed "
                    'there: close it, or write a quote inside a quoted field twice ("")'
                )


def _csv_problem(
    path: Path, text: str, delimiter: str, start: int, header: Optional[list[str]], error: str
) -> RaptRegError:
    """Find, in the record starting on line ``start``, where the csv module stopped, and say
    what to do about it (the module itself tells neither the line nor the column)."""
    offset = 0
    for _ in range(start - 1):
        offset = text.index("\n", offset) + 1
    line, column, field, size = start, 1, 0, 0
    quoted, at_start, opened = False, True, (start, 1)

    def where(line: int, field: int) -> str:
        name = f" {header[field]!r}" if header is not None and field < len(header) else ""
        return f"{path}: line {line}, column {field + 1}{name}"

    i = offset
    while i < len(text):
        char = text[i]
        step = 1
        if quoted and char == '"' and text[i + 1 : i + 2] == '"':
            step = 2  # a quote written twice inside a quoted field
        elif quoted and char == '"':
            quoted, after = False, text[i + 1 : i + 2]
            if after not in ("", delimiter, "\n", "\r"):
                return RaptRegError(
                    f"{where(line, field)}: the quoted field that opens on line {opened[0]} "
                    f"closes at character {column} and goes on with {after!r}; write a quote "
                    'inside a quoted field twice ("")'
                )
        elif not quoted and char == '"' and at_start:
            quoted, opened = True, (line, column)
        elif not quoted and char == delimiter:
            field, size, at_start, i, column = field + 1, 0, True, i + 1, column + 1
            continue
        elif not quoted and char in "\r\n":
            break  # the end of the record
        size += 1
        if size > MAX_FIELD_CHARS:
            return RaptRegError(
                f"{where(opened[0] if quoted else line, field)}: a field longer than "
                f"{MAX_FIELD_CHARS:,} characters, the most read; if a quote opened there is "
                "not meant to run on, remove it, otherwise shorten the text"
            )
        at_start = False
        if char == "\n":
            line, column = line + 1, 0
        i, column = i + step, column + step
    if quoted:
        return RaptRegError(
            f"{where(opened[0], field)}: the quote at character {opened[1]} opens a field that "
            'is never closed; close it, or write a quote inside a quoted field twice ("")'
        )
    kind = "TSV" if delimiter == "\t" else "CSV"
    return RaptRegError(f"{path}: line {start}: not valid {kind} ({error})")


def _json_lines(path: Path, text: str, columns: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue

        def pairs(items: list[tuple[str, Any]], line: int = line) -> dict[str, Any]:
            keys = [k for k, _ in items]
            for key in columns:
                if keys.count(key) > 1:
                    raise RaptRegError(
                        f"{path}: line {line}: the key {key!r} appears twice in one object; "
                        "keep one"
                    )
            return dict(items)

        try:
            row = json.loads(raw, object_pairs_hook=pairs)
        except json.JSONDecodeError as error:
            raise RaptRegError(
                f"{path}: line {line}, column {error.colno} is not valid JSON ({error.msg}); "
                "a JSON Lines file holds one object per line"
            ) from None
        if not isinstance(row, dict):
            raise RaptRegError(
                f"{path}: line {line} is not a JSON object; a JSON Lines file holds one "
                '{"text": ..., "label": ...} object per line'
            )
        for column, flag in zip(columns, ("--text-column", "--label-column")):
            if column not in row:
                raise RaptRegError(
                    f"{path}: line {line} has no key {column!r} (it has: "
                    f"{', '.join(map(repr, row)) or 'none'}); name the right one with {flag}"
                )
        rows.append((line, row))
    return rows


def _folder_files(root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    # Class name -> its .txt files (any case of the ending), sorted; and what is skipped.
    classes: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(("_", ".")) or entry.name.lower() in _SYSTEM_FILES:
            continue
        if not entry.is_dir():
            skipped.append(entry.name)
            continue
        files = classes.setdefault(entry.name, [])
        for item in sorted(entry.iterdir()):
            if item.name.lower() in _SYSTEM_FILES:
                continue
            if item.is_file() and item.suffix.lower() == ".txt" and not item.name.startswith("."):
                files.append(item)
            else:
                skipped.append(f"{entry.name}/{item.name}{'/' if item.is_dir() else ''}")
    return classes, skipped


def _listed(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def read_folder(
    root: Path,
    encoding: str = "utf-8",
    fallback_encoding: Optional[str] = None,
    flag: str = "--data",
) -> TextCorpus:
    """Read a folder holding one sub-folder of ``.txt`` files per class.

    Class folders and the files in them are read in sorted order; the folder name is the label.
    Files ending in ``.txt`` in any case are read; everything else in a class folder, and
    every file beside the class folders, is skipped and listed in ``skipped``. Folders whose
    name starts with ``_`` or ``.``, and system files (``.DS_Store``, ``Thumbs.db``,
    ``desktop.ini``), are passed over without a word.

    Args:
        root: The folder.
        encoding: How the files are encoded (a UTF-8 byte-order mark is skipped).
        fallback_encoding: Decode a file that is not valid in ``encoding`` with this one
            instead of refusing it (BBC News has a few Windows-1252 files among UTF-8 ones).
        flag: The option that named the folder, for messages.

    Returns:
        The corpus; ``sources`` are ``"class/file.txt"``.

    Raises:
        RaptRegError: If the folder has no class folders, a class folder has no ``.txt``
            file (naming the files skipped there), or a file is empty or not valid in
            ``encoding``.
    """
    root = Path(root)
    if not root.is_dir():
        if not root.exists():
            raise _missing_path(root, flag)
        raise RaptRegError(f"{flag} {root}: not a folder")
    classes, skipped = _folder_files(root)
    if not classes:
        beside = f" (it holds: {_listed(skipped)})" if skipped else ""
        raise RaptRegError(
            f"{flag} {root}: no class folders{beside}; a data folder needs one sub-folder of "
            ".txt files per class, named after the class"
        )
    texts: list[str] = []
    labels: list[str] = []
    sources: list[str] = []
    for name, files in classes.items():
        if not files:
            there = [s.split("/", 1)[1] for s in skipped if s.startswith(f"{name}/")]
            what = f"only {_listed(there)}, which are not .txt" if there else "nothing"
            raise RaptRegError(
                f"{root / name}: the class folder {name!r} holds {what}; put its examples in "
                ".txt files, or move the folder out of the data folder"
            )
        for path in files:
            text = _clean(_decode(path.read_bytes(), str(path), encoding, fallback_encoding))
            if not text:
                raise RaptRegError(f"{path}: the file is empty; remove it or give it a text")
            texts.append(text)
            labels.append(name)
            sources.append(f"{name}/{path.name}")
    return TextCorpus(texts, labels, sources, str(root), tuple(skipped))


def read_corpus(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    fallback_encoding: Optional[str] = None,
    flag: str = "--data",
) -> TextCorpus:
    """Read a table (:func:`read_table`) or a folder (:func:`read_folder`), by what ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, encoding, fallback_encoding, flag)
    return read_table(path, text_column, label_column, encoding, flag)


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of the files a folder is read from, with their names
    relative to it (the class folders' names are part of the data): the data's identity,
    wherever it lies and whatever the file is called."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    sha = hashlib.sha256()
    classes, _ = _folder_files(path)
    for name, found in classes.items():
        for file in found:
            sha.update(f"{name}/{file.name}".encode())
            sha.update(file.read_bytes())
    return sha.hexdigest()


#: More classes than this, and more than half as many as examples, look like an id column.
MAX_UNIQUE_CLASSES = 20


def _where(corpus: TextCorpus, index: int) -> str:
    source = corpus.sources[index]
    if ":" in source:  # "file:line" of a table
        return f"{corpus.origin}: line {source.rsplit(':', 1)[1]}"
    return str(Path(corpus.origin) / source)


def check_training_classes(train: TextCorpus, test: Optional[TextCorpus] = None) -> None:
    """Refuse data a classifier cannot be compared on.

    Args:
        train: The training data (or all the data, when there is no test file).
        test: The test file's data, if any.

    Raises:
        RaptRegError: If the training data has one class only; if it has more than
            :data:`MAX_UNIQUE_CLASSES` classes and more than half as many classes as examples
            (an id or a text read as the label); or if the test data has a label the training
            data never has (naming its file and line).
    """
    classes = train.class_names
    if len(classes) < 2:
        raise RaptRegError(
            f"{train.origin}: every example has the label {classes[0]!r}; a classifier needs "
            "at least two classes (check --label-column)"
        )
    if len(classes) > MAX_UNIQUE_CLASSES and 2 * len(classes) > len(train):
        raise RaptRegError(
            f"{train.origin}: {len(classes)} distinct labels in {len(train)} examples (e.g. "
            f"{', '.join(map(repr, classes[:3]))}): that reads like an id or a text, not a "
            "class; check --label-column"
        )
    if test is not None:
        known = set(classes)
        numbers = {_as_number(c): c for c in classes if _as_number(c) is not None}
        for index, label in enumerate(test.labels):
            if label not in known:
                same = numbers.get(_as_number(label))
                hint = f" (it writes that number {same!r})" if same is not None else ""
                raise RaptRegError(
                    f"{_where(test, index)}: the label {label!r} is not a label of the training "
                    f"data {train.origin}{hint}; it has: {_listed([repr(c) for c in classes], 8)}"
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
