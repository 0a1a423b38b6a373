"""``python -m dream.cli`` (used by ``torchrun -m dream.cli train ...``)."""
import sys

from dream.cli import main

sys.exit(main())
