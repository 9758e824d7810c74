"""``python -m gmem.cli``: the ``gmem`` command (:func:`gmem.cli.main`)."""
import sys

from . import main

sys.exit(main())
