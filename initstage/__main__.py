"""``python -m initstage PLAN``: run the stage (it refuses unless it is PID 1).

The injector does not use this entry: it runs :func:`initstage.launch.stage_argv`, whose
bootstrap also survives a stage that fails to import. This one is for people.
"""

from __future__ import annotations

import sys

from initstage.stage import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
