"""``python -m perceptual_diffusion.cli``: the same as the ``perceptual-diffusion`` command."""

import sys

from . import main

sys.exit(main())
