"""``python -m jobs <verb>``: the same as ``imgscan <verb>`` (what ``ray job submit`` runs)."""

import sys

from jobs.cli import main

sys.exit(main())
