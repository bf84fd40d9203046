"""What a user installs: version from one source, dependencies equal to imports, the wheel's files.

The tests on installed metadata skip when ``rapt_reg`` is imported from the source tree without
an install; ``scripts/test-wheel.sh`` (CI) runs them against the installed wheel.
"""

import ast
import importlib.metadata as md
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import rapt_reg

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(rapt_reg.__file__).resolve().parent
FROM_TREE = ROOT in PACKAGE.parents

# Modules that run only with an optional extra installed, and that extra.
OPTIONAL_MODULES = {
    "rapt_reg.demo": "demo",
    "rapt_reg.compare": "demo",
    "rapt_reg.integrations.transformers": "transformers",
    "rapt_reg.integrations.lightning": "integrations",
}
IMPORT_FUNCTIONS = {"import_module", "find_spec", "__import__"}


def _installed() -> md.Distribution:
    if FROM_TREE:
        pytest.skip("rapt_reg is imported from the source tree: run scripts/test-wheel.sh")
    return md.distribution("rapt-reg")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_top_names(path: Path) -> set[str]:
    """Top-level names of absolute imports, ``import_module("x")`` and ``find_spec("x")``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if called in IMPORT_FUNCTIONS and isinstance(arg, ast.Constant):
                names.add(str(arg.value).split(".")[0])
    return names


def _extra_of(module: str) -> str | None:
    for prefix, extra in OPTIONAL_MODULES.items():
        if module == prefix or module.startswith(prefix + "."):
            return extra
    return None


def _third_party_imports() -> dict[str | None, set[str]]:
    """Distributions imported by the package's modules, grouped by extra (None: the core)."""
    distributions = md.packages_distributions()
    found: dict[str | None, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        extra = _extra_of(_module_name(path))
        for name in _imported_top_names(path):
            if name in sys.stdlib_module_names or name in ("__future__", "rapt_reg"):
                continue
            assert name in distributions, f"{path.name} imports {name!r}, which no package provides"
            dists = {canonicalize_name(dist) for dist in distributions[name]}
            found.setdefault(extra, set()).update(dists)
    return found


def _requirements() -> dict[str | None, set[str]]:
    by_extra: dict[str | None, set[str]] = {}
    for line in _installed().requires or []:
        req = Requirement(line)
        extras = [
            extra
            for extra in ("test", "transformers", "demo", "integrations", "docs", "dev")
            if req.marker is not None and req.marker.evaluate({"extra": extra})
        ]
        for extra in extras if req.marker is not None else [None]:
            by_extra.setdefault(extra, set()).add(canonicalize_name(req.name))
    return by_extra


@pytest.mark.promise("version-one-source")
def test_version_has_one_source():
    assert md.version(_installed().name) == rapt_reg.__version__


@pytest.mark.promise("torch-only-dependency")
def test_runtime_dependencies_are_exactly_the_core_imports():
    imports, required = _third_party_imports(), _requirements()
    assert imports[None] == required[None] == {"torch"}


@pytest.mark.promise("extras-cover-imports")
@pytest.mark.parametrize("extra", sorted(set(OPTIONAL_MODULES.values())))
def test_each_extra_provides_what_its_modules_import(extra):
    imports, required = _third_party_imports(), _requirements()
    missing = imports.get(extra, set()) - required[None] - required[extra]
    assert not missing, f"modules of the {extra!r} extra import {missing} not in the extra"


@pytest.mark.promise("core-without-numpy")
def test_core_runs_without_numpy():
    """The core imports no numpy, even through a path not seen by the import scan."""
    code = """
        import sys
        sys.modules["numpy"] = None  # any `import numpy` now raises ImportError
        import warnings
        warnings.simplefilter("ignore")  # torch may say that numpy is missing
        import torch
        from torch import nn
        import rapt_reg, rapt_reg.integrations
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        x = torch.randn(2, 3, 8)
        with rapt_reg.RandomPerturbationRegularizer(model, max_layer=1) as reg:
            out, penalty = reg.pair(lambda: model(x))
            penalty.backward()
        print("ok", float(penalty) >= 0)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "True"]


@pytest.mark.promise("wheel-contents")
def test_wheel_holds_the_package_and_py_typed_only():
    files = [str(path) for path in _installed().files or []]
    assert "rapt_reg/py.typed" in files
    assert "rapt_reg/__init__.py" in files
    outside = [
        path
        for path in files
        if not path.startswith(("rapt_reg/", "rapt_reg-"))  # the package and its .dist-info
        and not path.endswith("bin/rapt-reg")  # the console script
    ]
    assert not outside, f"the wheel installs files outside the package: {outside}"


@pytest.mark.promise("ci-tests-lower-bounds")
def test_ci_tests_the_lower_bounds_the_metadata_states():
    """README: the lower bounds of Python and torch are the versions CI runs."""
    if os.environ.get("RAPT_REG_TEST_INSTALLED") != "1":
        pytest.skip("only where CI runs: scripts/test-wheel.sh")
    import torch

    metadata = _installed().metadata
    assert metadata["Requires-Python"] == f">={sys.version_info.major}.{sys.version_info.minor}"
    torch_version = torch.__version__.split("+")[0]
    assert f"torch>={torch_version.rsplit('.', 1)[0]}" in (_installed().requires or [])


@pytest.mark.promise("ci-mutation-score")
def test_ci_runs_the_mutation_score_of_replay_and_discovery_with_a_90_percent_floor():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython scripts/mutation.py --modules replay,discovery\n" in ci
    script = (ROOT / "scripts" / "mutation.py").read_text()
    assert 'parser.add_argument("--min-score", type=float, default=90.0)' in script
