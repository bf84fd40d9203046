"""The public API as text: every public name with its signature, checked against a snapshot.

    python scripts/api_snapshot.py            # print the source tree's public API
    python scripts/api_snapshot.py --update   # rewrite tests/public_api.txt from the tree

Covers ``rapt_reg.__all__`` (the regularizers, the baselines, discovery, noise, errors), the
lazy names of ``rapt_reg.integrations`` (importing them needs the ``integrations`` extra) and,
for each class, its public methods, properties and attributes, with those it inherits from
rapt_reg's own classes. ``tests/test_public_api.py`` fails when the API differs from the
snapshot: a change of the API is made on purpose, with the snapshot and CHANGELOG.md updated
in the same commit.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "public_api.txt"
# Dunder methods that are part of how a user calls an object.
PUBLIC_DUNDERS = {"__call__", "__enter__", "__exit__", "__iter__", "__len__", "__getitem__"}


def _signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # reprs of default objects carry addresses


def _defined_in_rapt_reg(cls: type, name: str) -> bool:
    owner = next(klass for klass in cls.__mro__ if name in vars(klass))
    return owner.__module__.startswith("rapt_reg")


def _class_lines(qualified: str, cls: type) -> list[str]:
    bases = ", ".join(f"{base.__module__}.{base.__qualname__}" for base in cls.__bases__)
    lines = [f"class {qualified}({bases}){_signature(cls)}"]
    for name in sorted(dir(cls)):
        if name.startswith("_") and name not in PUBLIC_DUNDERS:
            continue
        if not _defined_in_rapt_reg(cls, name):
            continue
        member = inspect.getattr_static(cls, name)
        if isinstance(member, property):
            lines.append(f"    property {name}")
        elif isinstance(member, (staticmethod, classmethod)):
            kind = type(member).__name__
            lines.append(f"    {kind} {name}{_signature(getattr(cls, name))}")
        elif inspect.isfunction(member):
            lines.append(f"    def {name}{_signature(member)}")
        else:
            lines.append(f"    attribute {name}")
    return lines


def _lines(qualified: str, obj: object) -> list[str]:
    if inspect.isclass(obj):
        return _class_lines(qualified, obj)
    if callable(obj):
        return [f"def {qualified}{_signature(obj)}"]
    return [f"{qualified}: {type(obj).__name__}"]


def render() -> str:
    """The public API of the ``rapt_reg`` that is imported, one line per name or member."""
    lines = []
    for module_name in ("rapt_reg", "rapt_reg.integrations"):
        module = importlib.import_module(module_name)
        for name in sorted(module.__all__):
            if name != "__version__":  # changes each release; tests/test_packaging.py checks it
                lines += _lines(f"{module_name}.{name}", getattr(module, name))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help=f"rewrite {SNAPSHOT.name}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the source tree's rapt_reg, installed or not
    text = render()
    if args.update:
        SNAPSHOT.write_text(text)
        print(f"wrote {SNAPSHOT.relative_to(ROOT)}: {text.count(chr(10))} lines")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
