"""``python -m alignkit`` (and ``accelerate launch -m alignkit``)."""

import sys

from .cli import main

sys.exit(main())
