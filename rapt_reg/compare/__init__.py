"""``rapt-reg compare``: does RAPT help on my data? Not part of the core.

Fine-tunes one copy of the same model per method (standard, RAPT, RAPT (Embedding), SMART,
R3F) and per seed, on the user's data, and answers with the paired difference to standard
fine-tuning and its 95% interval over seeds. Needs the ``demo`` extra:
``pip install "rapt-reg[demo]"``. See ``docs/compare.md``.

Modules: :mod:`~rapt_reg.compare.data` (reading, checking, splitting text),
:mod:`~rapt_reg.compare.training` (settings and the training loop),
:mod:`~rapt_reg.compare.report` (statistics, table, plot) and
:mod:`~rapt_reg.compare.cli` (command line and driver).
"""

from rapt_reg.compare.cli import main, run
from rapt_reg.compare.training import METHODS, CompareConfig, RunResult

__all__ = ["METHODS", "CompareConfig", "RunResult", "main", "run"]
