"""``python -m perceptual_diffusion.cli``: the same as the ``perceptual-diffusion`` command."""

import sys

from perceptual_diffusion.cli import main

sys.exit(main())
