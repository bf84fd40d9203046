"""``python -m rapt_reg.demo``: the BBC News demo (the same as ``rapt-reg``)."""

import sys

from rapt_reg.demo import main

sys.exit(main())
