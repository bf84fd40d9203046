"""Count tensor-to-host conversions made in Python during a block of code.

On a GPU each of these waits for the device to finish everything queued before it (a host
synchronisation): ``Tensor.item``, ``float(t)``, ``int(t)``, ``bool(t)`` (``if t:``),
``t.tolist()``, ``t.__index__`` (a tensor used as an index or a ``range`` bound), and indexing
with a boolean tensor (``t[mask]``: its output size is known only after counting the mask).
Conversions made inside C++ kernels are not seen; on CUDA,
``torch.cuda.set_sync_debug_mode("error")`` sees those too.

Use the context manager, or the ``host_syncs`` fixture (import it into the test module)::

    with count_host_syncs() as counts:
        step()
    assert counts.total == 0, counts
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch

CONVERSIONS = ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")
BOOLEAN_INDEX = "boolean index"


_TORCH = os.path.dirname(torch.__file__)


class HostSyncs(Counter):
    """Calls per kind of conversion (``Counter``); ``total`` is their sum.

    ``calls`` lists each call as ``(kind, device type, "file:line")``, the line being the first
    caller outside torch (the model's, the library's or the test's own code).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.values())

    def made_by(self, path_part: str, *, device: str | None = None) -> list[tuple[str, str, str]]:
        """The calls made from files whose path contains ``path_part`` (on ``device`` only)."""
        return [c for c in self.calls if path_part in c[2] and (device is None or c[1] == device)]

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        frame = sys._getframe(2)
        while frame.f_back is not None and (
            frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__
        ):
            frame = frame.f_back
        self[kind] += 1
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        self.calls.append((kind, tensor.device.type, where))


def _has_boolean_tensor(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) and i.ndim > 0
        for i in items
    )


class _BooleanIndexing(torch.overrides.TorchFunctionMode):
    """Counts ``t[mask]`` and ``t[mask] = v``. A mode, not a patched ``Tensor.__getitem__``:
    assigning ``__getitem__`` to ``torch.Tensor`` fills CPython's sequence slot of the class
    for good, after which ``torch.tensor([t0, t1])`` of 0-d tensors fails in later tests.

    The patched conversions reach the mode too (their originals dispatch to it): it runs the
    original, so that each conversion is counted once, by its wrapper.
    """

    def __init__(self, counts: HostSyncs, originals: dict[Any, Any]) -> None:
        super().__init__()
        self.counts, self.originals = counts, originals

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        indexing = func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__
        if indexing and _has_boolean_tensor(args[1]):
            self.counts.record(BOOLEAN_INDEX, args[0])
        return self.originals.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Patch ``torch.Tensor``'s conversions with counting wrappers while the block runs."""
    counts = HostSyncs()
    own = {name for name in CONVERSIONS if name in vars(torch.Tensor)}  # the rest are inherited
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts.record(name.strip("_"), self)
            return original(self, *args, **kwargs)

        return wrapper

    wrappers = {name: counting(name, original) for name, original in originals.items()}
    try:
        for name, wrapper in wrappers.items():
            setattr(torch.Tensor, name, wrapper)
        with _BooleanIndexing(counts, {wrappers[n]: originals[n] for n in CONVERSIONS}):
            yield counts
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)


@pytest.fixture
def host_syncs() -> Iterator[Callable[[], contextlib.AbstractContextManager[HostSyncs]]]:
    """``with host_syncs() as counts: ...``: :func:`count_host_syncs` as a fixture."""
    yield count_host_syncs
