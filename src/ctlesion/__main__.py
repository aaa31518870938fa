"""``python -m ctlesion ...`` (what ``torchrun -m ctlesion train ...`` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
