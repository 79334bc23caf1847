"""``python -m fdqn`` runs the training program, as ``python -m fdqn.train`` does."""

import sys

from fdqn.train import main

sys.exit(main())
