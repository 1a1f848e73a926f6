"""`posttrain` under torchrun for tests/test_distributed.py: each "::"-separated part of the command line is
one CLI run, all in the same process group. POSTTRAIN_TEST_MUTATION=local_counts makes every rank use its
own counts instead of the global ones -- the mistake the N-ranks == 1-rank tests must catch."""

import os
import sys

from posttrain.commands.main import main
from posttrain.runtime import distributed

if os.environ.get("POSTTRAIN_TEST_MUTATION") == "local_counts":
    distributed.Dist.sum = lambda self, x: x

runs, part = [], []
for arg in sys.argv[1:] + ["::"]:
    if arg == "::":
        runs.append(part)
        part = []
    else:
        part.append(arg)
for argv in runs:
    code = main(argv)
    if code:
        sys.exit(code)
