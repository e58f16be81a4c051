"""qmatmul under shard_map, the weight split along N or K at block boundaries, equals the
unsharded call, for the XLA path and both kernels (interpreted); the kernels also lower for
their platforms under shard_map.

Runs in a subprocess: the 4-device CPU mesh needs XLA_FLAGS set before jax starts, which
must not leak into the other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import dataclasses, functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from jqlora.kernels import qmatmul
    from jqlora.quant import decode_absmax, quantize

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    n, k, bs = 128, 512, 64  # per device along N: 32 rows x 8 blocks = one nested block of 256
    qt = quantize(jax.random.normal(jax.random.key(0), (n, k)), "nf4", bs, True)
    x = jax.random.normal(jax.random.key(1), (7, k))
    worst = 0.0

    def check(got, want):
        global worst
        err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        worst = max(worst, err)
        assert err < 1e-5, err

    for backend in ("xla", "pallas_gpu", "pallas_tpu"):
        f = lambda x, w: qmatmul(x, w, backend=backend)
        # The Pallas interpreter loses the varying-axes types of loop-carried refs (a jax
        # limitation of interpret mode only), so its runs skip that type check.
        smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=backend == "xla")
        want = jax.jit(f)(x, qt)

        # N split: each device holds whole rows (codes, absmax and nested absmax in step).
        spec_n = dataclasses.replace(qt, codes=P("d", None), absmax=P("d"), nested_absmax=P("d"), offset=P())
        by_n = jax.jit(smap(f, in_specs=(P(), spec_n), out_specs=P(None, "d")))
        check(by_n(x, qt), want)

        # K split: scales laid out [N, K / bs] so that columns shard; partial sums add up.
        qk = dataclasses.replace(qt, absmax=decode_absmax(qt).reshape(n, k // bs), nested_absmax=None, offset=None)
        spec_k = dataclasses.replace(qk, codes=P(None, "d"), absmax=P(None, "d"))
        g = lambda x, w: jax.lax.psum(f(x, w), "d")
        by_k = jax.jit(smap(g, in_specs=(P(None, "d"), spec_k), out_specs=P()))
        check(by_k(x, qk), want)

    # Compiled (not interpreted) kernels keep the varying-axes check on.
    from jqlora.kernels import gpu_tiles, pallas_gpu, pallas_tpu
    spec_n = dataclasses.replace(qt, codes=P("d", None), absmax=P("d"), nested_absmax=P("d"), offset=P())
    # jax >= 0.11 lowers a Triton kernel only for a known GPU: with none attached, the mesh
    # names one (an abstract H100), and the inputs are typed against that mesh.
    from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
    gpu_mesh = AbstractMesh((4,), ("d",), abstract_device=AbstractDevice("NVIDIA H100", None, "gpu"))
    typed = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(gpu_mesh, spec))
    gpu_args = (typed(x.astype(jnp.bfloat16), P()), jax.tree.map(typed, qt, spec_n))
    for kernel, platform, m, args in (
        (pallas_gpu, "cuda", gpu_mesh, gpu_args),
        (pallas_tpu, "tpu", mesh, (x.astype(jnp.bfloat16), qt)),
    ):
        route = (gpu_tiles.route(7, "fwd"),) if kernel is pallas_gpu else ()
        h = lambda x, w: kernel.matmul(x, w, jnp.bfloat16, *route)
        h = jax.shard_map(h, mesh=m, in_specs=(P(), spec_n), out_specs=P(None, "d"))
        with jax.sharding.use_abstract_mesh(m.abstract_mesh if platform == "tpu" else m):
            text = jax.jit(h).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert "custom_call" in text, platform
    print("worst relative error", worst)
    """
)


def test_sharded_along_n_and_k_equals_unsharded():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    env.pop("JQLORA_QMATMUL", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worst relative error" in done.stdout
