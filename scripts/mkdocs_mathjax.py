"""mkdocs hook: serve MathJax from the site itself, so that the maths renders with no network.

MathJax 3 comes from the ``django-static-mathjax`` package (in the ``docs`` extra): a copy of
MathJax's files and nothing else (it needs no Django). After each build this hook copies the
part the site loads (the TeX-to-HTML bundle, its fonts, the TeX extensions it loads on demand
and its menu) into ``site/javascripts/mathjax/``; ``mkdocs.yml`` loads it from there.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y")


def mathjax_dir() -> Path:
    """MathJax's ``es5`` folder inside the installed ``django-static-mathjax`` package."""
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.origin is not None:
        es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5"
        if (es5 / "tex-chtml.js").is_file():
            return es5
    raise PluginError(
        "the docs serve MathJax from the site itself and take it from the django-static-mathjax "
        "package: pip install '.[docs]'"
    )


def on_post_build(config: Any, **kwargs: Any) -> None:
    source = mathjax_dir()
    target = Path(config["site_dir"]) / "javascripts" / "mathjax"
    for part in PARTS:
        (target / part).parent.mkdir(parents=True, exist_ok=True)
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
        else:
            shutil.copy2(source / part, target / part)
