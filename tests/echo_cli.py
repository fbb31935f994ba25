"""``python tests/echo_cli.py run RECIPE ...``: the alignkit CLI with the test-only ``echo`` stage kind registered,
for tests that need separate processes (the run-folder lock) or ``accelerate launch``. Running a script puts its
folder (tests/) on ``sys.path``, so ``echo_stage`` imports."""

import sys

from alignkit.cli import main
from alignkit.core.stage import STAGES

STAGES["echo"] = "echo_stage"
sys.exit(main())
