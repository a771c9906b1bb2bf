"""``python -m flamingo_eval`` (also ``accelerate launch -m flamingo_eval``): the ``flamingo-eval`` CLI."""

import sys

from .cli import main

sys.exit(main())
