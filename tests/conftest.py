"""Shared test setup: quiet imports of the reference libraries."""

import logging

# bitsandbytes logs a warning at import when an optional CPU kernel package is absent; it
# then uses its own CPU code, which is the reference the tests compare against.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
