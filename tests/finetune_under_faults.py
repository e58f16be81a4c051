"""`jqlora finetune` with its checkpoint writes made observable and pausable, for kill tests.

    python finetune_under_faults.py [--pause-at EVENT:N] finetune ARGS...

Runs ``jqlora.app.cli.main(["finetune", ...])`` in this process after wrapping what
``jqlora.train.checkpoint`` calls (its ``os``, ``np`` and ``shutil``), the train step and
the adapter writer, so that each of these moments prints a line ``@@ EVENT [STEP]`` to
stdout (flushed at once):

    start               before jqlora is imported
    step                after each call of the train step
    save.begin STEP     a checkpoint save starts
    save.tmp-created    its temporary directory exists, empty
    save.npz-half       half of arrays.npz is written
    save.npz-synced     arrays.npz is written and fsynced
    save.meta-synced    meta.json is written and fsynced (the rename comes next)
    save.published      the checkpoint is renamed into place
    save.removing-old   a directory is being deleted: one file of it is gone
    save.done STEP      the save returned
    adapter.begin       the final PEFT adapter is about to be written

With ``--pause-at EVENT:N`` the process stops at the N-th EVENT, prints
``@@ paused EVENT`` and sleeps until it is killed. The bytes written are those jqlora
writes; only the moments in between are exposed.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import time

_counts: collections.Counter = collections.Counter()
_pause: tuple[str, int] | None = None


def emit(name: str, *args) -> None:
    print("@@", name, *args, flush=True)
    _counts[name] += 1
    if _pause == (name, _counts[name]):
        print("@@ paused", name, flush=True)
        while True:
            time.sleep(3600)


class _Proxy:
    """A module with some functions replaced; everything else is the module's own."""

    def __init__(self, real, **replaced):
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _install_hooks() -> None:
    import shutil

    import numpy as np

    from jqlora.app import prepare
    from jqlora.hf import peft
    from jqlora.train import checkpoint as ckpt

    def makedirs(path, *args, **kwargs):
        os.makedirs(path, *args, **kwargs)
        if os.path.basename(path).startswith(".tmp-step_"):
            emit("save.tmp-created")

    def fsync(fd):
        os.fsync(fd)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name == "arrays.npz":
            emit("save.npz-synced")
        elif name == "meta.json":
            emit("save.meta-synced")

    def rename(src, dst):
        os.rename(src, dst)
        if ckpt._NAME.match(os.path.basename(dst)):
            emit("save.published")

    def savez(file, **arrays):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        emit("save.npz-half")
        file.write(data[len(data) // 2 :])

    def rmtree(path, *args, **kwargs):
        files = sorted(os.listdir(path)) if os.path.isdir(path) else []
        if files:
            os.remove(os.path.join(path, files[0]))
            emit("save.removing-old")
        shutil.rmtree(path, *args, **kwargs)

    ckpt.os = _Proxy(os, makedirs=makedirs, fsync=fsync, rename=rename)
    ckpt.np = _Proxy(np, savez=savez)
    ckpt.shutil = _Proxy(shutil, rmtree=rmtree)

    save_checkpoint = ckpt.save_checkpoint

    def saving(directory, step, *args, **kwargs):
        emit("save.begin", step)
        path = save_checkpoint(directory, step, *args, **kwargs)
        emit("save.done", step)
        return path

    ckpt.save_checkpoint = saving

    make_train_step = prepare.make_train_step

    def make_observed_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def observed(*a, **k):
            out = step(*a, **k)
            emit("step")
            return out

        return observed

    prepare.make_train_step = make_observed_step

    save_peft_adapter = peft.save_peft_adapter

    def adapter(*args, **kwargs):
        emit("adapter.begin")
        return save_peft_adapter(*args, **kwargs)

    peft.save_peft_adapter = adapter


def main(argv: list[str]) -> int:
    global _pause
    if argv[:1] == ["--pause-at"]:
        name, n = argv[1].rsplit(":", 1)
        _pause = (name, int(n))
        argv = argv[2:]
    emit("start")
    _install_hooks()
    from jqlora.app.cli import main as jqlora_main

    return jqlora_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
