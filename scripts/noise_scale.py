"""Measure the noise-to-hidden ratio at each layer of every architecture in the compatibility set.

Usage::

    python scripts/noise_scale.py                  # print the tables
    python scripts/noise_scale.py --write          # and put them in docs/noise-scale.md

For every model of ``tests/hf_models.py`` (tiny configs, random weights, the same batches as
the compatibility tests) and every layer 0-3, one RAPT noisy pass at the defaults (eta = 2,
inf-norm per example) gives ``reg.last_noise_to_hidden_ratio`` = ||delta|| / ||h|| at the
perturbed layer (Frobenius norms over the batch), the median over ``--draws`` noise draws.
Padding is left out of the noise (the batch's ``attention_mask`` is passed as ``noise_mask``).
The second table does the same with ``eta_scale="hidden_rms"``. The tables go between the
``<!-- noise-scale:begin -->`` and ``<!-- noise-scale:end -->`` markers of the page.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
PAGE = ROOT / "docs" / "noise-scale.md"
BEGIN, END = "<!-- noise-scale:begin -->", "<!-- noise-scale:end -->"
LAYERS = range(4)


def ratios(name: str, eta_scale: str, draws: int) -> dict[int, float]:
    """Median noise-to-hidden ratio per layer for one architecture."""
    from hf_models import CASES

    from rapt_reg import RandomPerturbationRegularizer
    from rapt_reg.integrations.masks import noise_inputs

    case = CASES[name]
    model, batch = case.build(), case.batch()
    noise = noise_inputs(batch)
    found = {}
    for layer in LAYERS:
        values = []
        for seed in range(draws):
            reg = RandomPerturbationRegularizer(
                model,
                min_layer=layer,
                max_layer=layer,
                eta_scale=eta_scale,
                generator=torch.Generator().manual_seed(seed),
            )
            with reg, torch.no_grad():
                reg(lambda: model(**batch), model(**batch), **noise)
                ratio = reg.last_noise_to_hidden_ratio
            assert ratio is not None
            values.append(ratio)
        found[layer] = statistics.median(values)
    return found


def table(results: dict[str, dict[int, float]]) -> str:
    from compat_matrix import ARCHITECTURES

    head = "| architecture | " + " | ".join(f"layer {k}" for k in LAYERS) + " | max / min |"
    lines = [head, "|" + "---|" * (len(LAYERS) + 2)]
    for name, by_layer in results.items():
        cells = " | ".join(f"{by_layer[k]:.3g}" for k in LAYERS)
        spread = max(by_layer.values()) / min(by_layer.values())
        lines.append(f"| {ARCHITECTURES.get(name, name)} | {cells} | {spread:.3g} |")
    every = [v for by_layer in results.values() for v in by_layer.values()]
    lines.append("")
    lines.append(
        f"Over all architectures and layers: min {min(every):.3g}, max {max(every):.3g}, "
        f"max / min = {max(every) / min(every):.3g}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update {PAGE.relative_to(ROOT)}")
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "scripts"))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from hf_models import CASES

    sections = []
    for eta_scale in ("absolute", "hidden_rms"):
        results = {name: ratios(name, eta_scale, args.draws) for name in CASES}
        title = f'eta_scale="{eta_scale}"' + (
            " (the default, the paper's)" if eta_scale == "absolute" else ""
        )
        sections.append(f"**{title}**, eta = 2:\n\n{table(results)}")
    text = "\n\n".join(sections)
    print(text)
    if args.write:
        page = PAGE.read_text()
        start, stop = page.index(BEGIN) + len(BEGIN), page.index(END)
        PAGE.write_text(page[:start] + "\n" + text + "\n" + page[stop:])
        print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
