"""`python -m posttrain ...` (and `torchrun --nproc-per-node N -m posttrain <recipe> CONFIG`): the CLI."""

import sys

from posttrain.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
