"""``python -m rapt_reg.compare``: the same as ``rapt-reg compare``."""

import sys

from rapt_reg.compare.cli import main

sys.exit(main())
