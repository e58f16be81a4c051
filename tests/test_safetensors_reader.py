"""jqlora.hf.safetensors_io reads through ``safe_open``: what it yields equals what the file
holds in every dtype a checkpoint uses, and where ``safe_open`` is stricter than the parser
it replaced (bytes the header does not cover) the answer is a ValueError naming the file,
as transformers (also ``safe_open``) refuses such a file too."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jqlora.hf import safetensors_io


def test_every_checkpoint_dtype_reads_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t.{dt}": torch.randn(3, 5, generator=g).to(dt)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    }
    tensors["codes"] = torch.randint(0, 255, (7, 2), dtype=torch.uint8, generator=g)
    tensors["ids"] = torch.arange(6, dtype=torch.int64)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    read = {name: array for name, _, array in safetensors_io.iter_tensors([path])}
    assert sorted(read) == sorted(tensors)
    for name, t in tensors.items():
        want = (
            t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            if t.dtype == torch.bfloat16
            else t.numpy()
        )
        assert read[name].dtype == want.dtype and np.array_equal(read[name], want), name
    infos = safetensors_io.tensor_infos([path])
    assert infos["t.torch.bfloat16"] == (path, (3, 5), "BF16")


@pytest.mark.parametrize("extra, offsets", [(48, [0, 16]), (16, [16, 32])])
def test_bytes_the_header_does_not_cover_are_refused_naming_the_file(tmp_path, extra, offsets):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16 + extra))
    with pytest.raises(
        ValueError, match=rf"{path}: not a valid safetensors file \(.*(covered|offset)"
    ):
        safetensors_io.read_header(path)
    from safetensors import SafetensorError, safe_open

    with pytest.raises(SafetensorError):  # the library transformers reads with refuses it too
        safe_open(str(path), framework="pt")
