"""Peak host memory while loading with quantization: at most 1.5x the quantized model plus the
largest single tensor, measured in a fresh process on a checkpoint made for it (many
layers, so that what is kept dominates what is transient)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

CONFIG = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}

MEASURE = textwrap.dedent(
    """
    import json, sys, threading, time
    import jax, jax.numpy as jnp, numpy as np
    import jqlora
    from jqlora.hf.names import flatten

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    # compile the quantizer for both weight shapes before the baseline is taken
    for shape in [(512, 512), (1024, 512), (512, 1024)]:
        jax.block_until_ready(jqlora.quantize(jnp.ones(shape, jnp.float32)))
    base = peak = rss()
    done = False

    def sample():
        global peak
        while not done:
            peak = max(peak, rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    model, params = jqlora.load_hf(sys.argv[1], jqlora.QuantConfig(), progress=False)
    done = True
    thread.join()
    kept = sum(getattr(v, "nbytes", 0) for v in flatten(params).values())
    print(json.dumps({"peak_increase": peak - base, "kept": kept}))
    """
)


def write_checkpoint(path):
    from safetensors.numpy import save_file

    from jqlora.hf.names import expected_params
    from jqlora.models import model_for_config

    rng = np.random.default_rng(0)
    shapes = expected_params(model_for_config(CONFIG)).shapes
    tensors = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return max(t.nbytes for t in tensors.values()), sum(t.nbytes for t in tensors.values())


def test_quantized_loading_peak_memory(tmp_path):
    largest, total_float = write_checkpoint(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    quantized, peak = result["kept"], result["peak_increase"]
    assert quantized < total_float / 5  # the model really is stored in 4 bits
    bound = 1.5 * quantized + largest
    assert peak <= bound, (
        f"peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB (quantized {quantized / 2**20:.1f} MiB)"
    )
