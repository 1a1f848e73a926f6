"""`python -m posttrain ...` (and `torchrun --nproc-per-node N -m posttrain <recipe> CONFIG`): the CLI."""

import sys

from posttrain.cli import main

sys.exit(main())
