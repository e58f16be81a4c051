"""Hugging Face Hub ids wherever a model path is taken, on a Hub cache laid out on disk.

There is no Hub here: a cache is written as huggingface_hub lays it out
(``$HF_HOME/hub/models--org--tiny/snapshots/<sha>/``, ``refs/main``, a tag ``refs/v2``) and
every process runs with ``HF_HOME`` pointing at it and ``HF_HUB_OFFLINE=1``, variables
huggingface_hub reads when it is imported: hence fresh processes. The reference for what
the id means is transformers resolving the same id in the same environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl

MAIN_SHA = "1" * 40
V2_SHA = "2" * 40


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """``HF_HOME`` holding ``org/tiny`` at two commits: ``main`` and the tag ``v2``
    (different weights), each a tiny Llama with a tokenizer and a chat template."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--tiny"
    texts = texts_of(chat_records())
    for sha, ref, seed in ((MAIN_SHA, "main", 0), (V2_SHA, "v2", 1)):
        make_tiny_model_dir(repo / "snapshots" / sha, texts, hidden=32, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return home


def run(hub_home, args, cwd=None):
    env = dict(os.environ, HF_HOME=str(hub_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


LIBRARY_CHECKS = """
import os, sys
import numpy as np
import jqlora
from jqlora.hf import names
from jqlora.hf.hub import resolve_model
from jqlora.hf.tokenizer import load_tokenizer
from transformers import AutoConfig, AutoTokenizer

home = os.environ["HF_HOME"]
snap = lambda sha: os.path.join(home, "hub", "models--org--tiny", "snapshots", sha)

def flat(path, **kw):
    return {k: np.asarray(v) for k, v in names.flatten(jqlora.load_hf(path, **kw)[1]).items()}

def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

# the id resolves to the snapshot transformers resolves it to, at main and at the tag
assert resolve_model("org/tiny") == snap(MAIN), resolve_model("org/tiny")
assert resolve_model("org/tiny", revision="v2") == snap(V2)
assert AutoConfig.from_pretrained("org/tiny").hidden_size == 32
main, v2 = flat("org/tiny"), flat("org/tiny", revision="v2")
assert same(main, flat(snap(MAIN))) and same(v2, flat(snap(V2))) and not same(main, v2)
text = "What is 3 plus zero?"
assert load_tokenizer("org/tiny")(text)["input_ids"] == AutoTokenizer.from_pretrained("org/tiny")(text)["input_ids"]

# neither cached nor reachable: one ValueError that names the id
for call in (lambda: jqlora.load_hf("org/missing"), lambda: load_tokenizer("org/missing"),
             lambda: jqlora.load_hf("org/tiny", revision="nope")):
    try:
        call()
    except ValueError as e:
        assert ("'org/missing'" in str(e) or "revision 'nope'" in str(e)) and "HF_HUB_OFFLINE" in str(e), e
    else:
        raise AssertionError("no error")

# a local directory of the same spelling wins over the id
os.makedirs("org")
os.symlink(snap(V2), "org/tiny")
assert resolve_model("org/tiny") == "org/tiny" and same(flat("org/tiny"), v2)
print("ok")
"""


def test_load_hf_and_tokenizer_resolve_a_hub_id_offline(hub_home, tmp_path):
    code = LIBRARY_CHECKS.replace("MAIN)", f"'{MAIN_SHA}')").replace("V2)", f"'{V2_SHA}')")
    done = run(hub_home, ["-c", textwrap.dedent(code)], cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.slow  # four fresh jqlora processes, one of them a finetune run
def test_commands_take_a_hub_id(hub_home, tmp_path):
    """``generate`` and ``finetune`` run from the id; an id that is not cached is one error line."""
    done = run(
        hub_home,
        ["-m", "jqlora", "generate", "--model", "org/tiny", "--prompt", "What is 3",
         "--max-new-tokens", "3"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(8))
    done = run(
        hub_home,
        ["-m", "jqlora", "finetune", "--model", "org/tiny", "--data", data, "--steps", "1",
         "--batch-size", "2", "--seq-len", "32", "--eval-every", "1", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    adapter_config = json.loads(next((tmp_path / "out").rglob("adapter_config.json")).read_text())
    assert adapter_config["base_model_name_or_path"] == "org/tiny"  # what PEFT loads the base by
    for command in (["generate", "--prompt", "hi"], ["estimate-memory"]):
        done = run(hub_home, ["-m", "jqlora", command[0], "--model", "org/missing", *command[1:]])
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "org/missing" in last and "HF_HUB_OFFLINE" in last, last


def test_ids_and_paths_are_told_apart():
    from jqlora.hf.hub import is_hub_id

    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("google/gemma-3-1b-it")
    for not_id in ("/abs/dir", "a/b/c", "./x/y", "dir/model.gguf", "gpt2", "a/../b", "a/b."):
        assert not is_hub_id(not_id), not_id


def test_an_unresolvable_path_is_left_for_the_reader_to_report(tmp_path):
    import jqlora

    with pytest.raises(ValueError, match=r"/nope: no such file or directory"):
        jqlora.load_hf(tmp_path / "nope")
