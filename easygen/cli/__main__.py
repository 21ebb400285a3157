"""``python -m easygen.cli ...`` (what torchrun launches): the ``easygen`` command."""
import sys

from . import main

sys.exit(main())
