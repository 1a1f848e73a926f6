"""`python scripts/_posttrain_main.py ARGS` = `posttrain ARGS` for whichever posttrain is first on PYTHONPATH."""

import sys

from posttrain.commands.main import main

sys.exit(main(sys.argv[1:]))
