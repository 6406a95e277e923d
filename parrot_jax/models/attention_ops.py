"""The unmasked attention product ``softmax(q k^T / sqrt(Dh)) v``, by implementation.

``model.attention`` picks one for the UNet's and the VAE's self-attention (cross-attention to
the 77 text tokens has tiny score matrices and always takes the XLA form):

- ``'xla'``: ``softmax_attention``, written for XLA's compilers (scores and softmax in float32,
  a hand-written backward pass that keeps only the log-sum-exp). libtpu fuses its forward;
  its backward materialises the ``[B, N, T, S]`` probabilities.
- ``'flash'``: jax's Pallas TPU flash-attention kernel, forward and backward: O(T) memory, no
  score matrix. It applies where both sequence lengths are multiples of 128; head sizes above
  128 are zero-padded to a multiple of 128 (exact). Shorter or odd sequences (SD 1.5's 8 x 8
  middle block) take the XLA form, whose score matrices are then small. Traced on a mesh
  (``parallel.traced_on``) the kernel runs per device on its share of the batch
  (``shard_map``): XLA does not partition a Pallas call, and refuses to compile it unsplit.
- ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (fused, O(T) memory)
  where cuDNN takes the shapes (bfloat16 / float16 operands, head size a multiple of 8 up to
  128); the XLA form elsewhere.
- ``'auto'`` (``resolve``): ``'flash'`` on TPU, ``'cudnn'`` on GPU, ``'xla'`` on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from parrot_jax.parallel import batch_axes

IMPLEMENTATIONS = ("auto", "xla", "flash", "cudnn")
_BY_PLATFORM = {"tpu": "flash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
FLASH_BLOCK = 128  # the Pallas kernel's lane width: sequence blocks and head sizes are multiples


def resolve(name: str, platform: str) -> str:
    """The implementation ``name`` means on ``platform`` ('cpu', 'gpu'/'cuda', 'tpu'); an
    explicit one that cannot run there raises ValueError naming it."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}; one of {IMPLEMENTATIONS}")
    if name == "auto":
        return _BY_PLATFORM.get(platform, "xla")
    if name == "flash" and platform != "tpu":
        raise ValueError(f"attention 'flash' is a TPU kernel; this is {platform!r} (use 'auto' "
                         "or 'xla')")
    if name == "cudnn" and platform not in ("gpu", "cuda"):
        raise ValueError(f"attention 'cudnn' needs an NVIDIA GPU; this is {platform!r} (use "
                         "'auto' or 'xla')")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla") -> jax.Array:
    """Unmasked attention: q ``[B, T, N, Dh]``, k / v ``[B, S, N, Dh]`` -> ``[B, T, N, Dh]``,
    by ``implementation`` (resolved: 'xla', 'flash' or 'cudnn'; see the module docstring)."""
    if implementation == "flash" and flash_applies(q, k):
        return _over_batch(flash_attention, q, k, v)
    if implementation == "cudnn" and cudnn_applies(q, k):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if implementation not in ("xla", "flash", "cudnn"):
        raise ValueError(f"attention implementation {implementation!r} (resolve 'auto' first)")
    return softmax_attention(q, k, v)


def flash_applies(q: jax.Array, k: jax.Array) -> bool:
    """The Pallas kernel's sequence blocks are multiples of 128 tokens."""
    return q.shape[1] % FLASH_BLOCK == 0 and k.shape[1] % FLASH_BLOCK == 0


def cudnn_applies(q: jax.Array, k: jax.Array) -> bool:
    """cuDNN's fused attention: half-precision operands, head size a multiple of 8, <= 128."""
    half = q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
    return half and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _over_batch(fn, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``fn(q, k, v)`` per device on its rows of the batch when traced on a mesh with batch
    axes (``parallel.traced_on``); replicated when the batch does not split over them; else
    directly."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    if not axes:
        return fn(q, k, v)
    spec = P(axes) if q.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0 else P()
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(q, k, v)


def _block(length: int, head: int, itemsize: int) -> int:
    """The sequence block: the largest of 512, 256, 128 dividing ``length`` whose q/k/v tiles
    (``block x head``, lanes padded to 128) stay within 128 KiB; 128 at least. Larger tiles
    overflow the kernel's 16 MiB of VMEM in the backward pass (SD's VAE: one 512-wide float32
    head)."""
    lanes = max(head, FLASH_BLOCK)
    fits = [b for b in (512, 256) if length % b == 0 and b * lanes * itemsize <= 128 * 1024]
    return fits[0] if fits else FLASH_BLOCK


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas TPU flash kernel on ``[B, T, N, Dh]`` operands (sequences multiples of 128).

    Runs on a TPU, or anywhere inside ``pltpu.force_tpu_interpret_mode()`` (tests). Head sizes
    above 128 that are not multiples of it are zero-padded: the scores, softmax and the kept
    columns of the output are unchanged. The kernel's dots take the ambient matmul precision,
    and a float32 one on bfloat16 operands does not compile ("Bad lhs type"), so bfloat16
    operands trace forward and backward under the default precision (see ``_precision``).
    """
    if _precision(q, k, v) is None:
        return _flash(q, k, v)
    return _flash_default_precision(q, k, v)


def _flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import flash_attention as kernel

    head = q.shape[-1]
    padded = head if head <= FLASH_BLOCK else -(-head // FLASH_BLOCK) * FLASH_BLOCK
    bq, bk = (_block(t.shape[1], padded, t.dtype.itemsize) for t in (q, k))
    blocks = kernel.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                               block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                               block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    heads_major = [jnp.swapaxes(t, 1, 2) for t in (q, k, v)]  # [B, N, T, Dh]
    if padded != head:
        heads_major = [jnp.pad(t, ((0, 0),) * 3 + ((0, padded - head),)) for t in heads_major]
    out = kernel.flash_attention(*heads_major, sm_scale=head ** -0.5, block_sizes=blocks)
    return jnp.swapaxes(out[..., :head], 1, 2)


@jax.custom_vjp
def _flash_default_precision(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    with jax.default_matmul_precision("default"):
        return _flash(q, k, v)


def _flash_forward(q, k, v):
    with jax.default_matmul_precision("default"):
        return jax.vjp(_flash, q, k, v)  # the backward (a pytree of arrays) is the residual


def _flash_backward(backward, d_out):
    with jax.default_matmul_precision("default"):
        return backward(d_out)


_flash_default_precision.defvjp(_flash_forward, _flash_backward)


# --- the XLA form ----------------------------------------------------------------------------

def _precision(*operands: jax.Array) -> lax.Precision | None:
    """``DEFAULT`` for an einsum whose operands are all narrower than float32, else None (the
    ambient ``jax.default_matmul_precision``, i.e. the config's ``matmul_precision``).

    A float32 contract precision means nothing for bfloat16 operands, and libtpu's fused
    attention kernel rejects it ("Mosaic failed to compile TPU kernel: Bad lhs type"): SD 1.5's
    bfloat16 rollout under ``matmul_precision='highest'`` did not compile for TPU without this.
    """
    narrow = all(jnp.finfo(t.dtype).bits < 32 for t in operands)
    return lax.Precision.DEFAULT if narrow else None


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked ``softmax(q k^T / sqrt(Dh)) v``: q ``[B, T, N, Dh]``, k / v ``[B, S, N, Dh]``.

    The same function as ``jax.nn.dot_product_attention`` without a mask, written for XLA's
    compilers: scores and softmax in float32, heads-major einsums for the plain forward, and a
    hand-written backward pass that keeps only the log-sum-exp ``[B, N, T]`` from the forward
    (not the ``[T, S]`` probabilities) and uses ``rowsum(dP * P) = rowsum(dO * O)``. On a CPU
    its fwd+bwd of a UNet's 1024-token self-attention (``[2, 1024, 8, 16]``) takes 75 ms, as
    torch's fused ``scaled_dot_product_attention`` does (more than 2x faster than
    ``jax.nn.dot_product_attention``), and its residual memory is O(T), not O(T * S), per
    layer. (The layouts were chosen by measurement: benchmarks/unet.py.)
    """
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q * q.shape[-1] ** -0.5, k, v))
    s = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32,
                   precision=_precision(qh, kh))
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", p, vh, precision=_precision(p, vh)), 1, 2)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """float32 ``[B, N, T, S]`` scaled scores from q ``[B, T, N, Dh]`` and k ``[B, S, N, Dh]``."""
    return jnp.einsum("btnh,bsnh->bnts", q * q.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32, precision=_precision(q, k))


def _times_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """``p [B, N, T, S] @ v [B, S, N, Dh] -> [B, T, N, Dh]`` through heads-major operands: the
    one layout of this product that XLA:CPU runs at full speed (2.7x the direct einsum)."""
    out = jnp.einsum("bnts,bnsh->bnth", p, jnp.swapaxes(v, 1, 2), precision=_precision(p, v))
    return jnp.swapaxes(out, 1, 2)


def _attention_forward(q, k, v):
    s = _scores(q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = _times_values(e.astype(v.dtype), v) / jnp.swapaxes(total, 1, 2)
    out = out.astype(v.dtype)
    return out, (q, k, v, out, (m + jnp.log(total))[..., 0])


def _attention_backward(residuals, d_out):
    q, k, v, out, lse = residuals
    p = jnp.exp(_scores(q, k) - lse[..., None])
    p_v = p.astype(v.dtype)
    dv = jnp.einsum("bnts,btnh->bsnh", p_v, d_out, precision=_precision(p_v, d_out))
    dp = jnp.einsum("btnh,bsnh->bnts", d_out, v, preferred_element_type=jnp.float32,
                    precision=_precision(d_out, v))
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    ds = (p * (dp - jnp.swapaxes(row, 1, 2)[..., None])).astype(q.dtype)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    dq = _times_values(ds, k) * scale
    dk = jnp.einsum("bnts,btnh->bsnh", ds, q, precision=_precision(ds, q)) * scale
    return dq, dk, dv


softmax_attention.defvjp(_attention_forward, _attention_backward)
