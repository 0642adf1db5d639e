"""``python -m cusa_hf.teachers``: the ``cusa-extract-teachers`` console script (for ``accelerate launch -m``)."""

from .cli import main

raise SystemExit(main())
