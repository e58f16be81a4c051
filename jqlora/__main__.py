"""``python -m jqlora``: the `jqlora` command (``jqlora.app.cli``)."""

import sys

from jqlora.app.cli import main

sys.exit(main())
