"""Running a snippet in a fresh CPU Python process: for settings that ``import jqlora``
makes once, before JAX's back end starts."""

import os
import subprocess
import sys


def run_python(code: str, unset=(), **env) -> str:
    """stdout of ``code`` run by a new interpreter on JAX's CPU back end, with the
    variables in ``unset`` removed from this process's environment and ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=dict(base, JAX_PLATFORMS="cpu", **env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
