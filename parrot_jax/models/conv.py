"""Stride-1 'same' convolutions with a backward pass that avoids XLA:CPU's kernel transposes.

XLA computes the input gradient of a convolution as a second convolution with the kernel
flipped and its in/out axes swapped, and on CPUs it materialises that kernel copy on every
call. For the wide, low-resolution layers of a UNet (e.g. a 3x3 kernel with 1024 -> 512
channels on 8x8 maps) the copy costs more than the convolution itself. There the input
gradient is cheaper as one matrix product with the kernel as it is stored
(``dy [M, O] @ kernel[kh*kw*I, O]^T``) followed by a shifted sum over the ``kh * kw`` taps
(col2im). At the lowest resolutions the kernel gradient, too, is cheaper as one matrix product,
of the im2col patches with ``dy`` (``patches[M, kh*kw*I]^T @ dy [M, O]``): XLA:CPU runs that
convolution on one thread whatever the pool size, the matmul on all of them. Which form is
cheaper depends on the ratio of the activations to the kernel, which is static, so
``same_conv`` picks per call site (``dot_input_grad``, ``dot_kernel_grad``), in programs
lowered for the CPU (``lax.platform_dependent``); other platforms keep XLA's gradients, and the
forward pass is XLA's own everywhere.

Elsewhere both gradients are written as *forward* convolutions (the input gradient with the
kernel flipped and transposed, the kernel gradient as a correlation of the input with ``dy``),
not as XLA's gradient convolutions: inside a loop body, such as the T2I step's scan over
timesteps, XLA:CPU runs its own gradient convolutions 30-50x slower than outside one, and
forward convolutions equally fast in both (``benchmarks/conv_grad.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def dot_input_grad(batch_pixels: int, out_channels: int) -> bool:
    """Whether the matmul + col2im input gradient beats XLA's transposed-kernel convolution.

    The col2im sum touches ``kh*kw * M * I`` values, the kernel copy ``kh*kw * I * O``: the
    matmul form wins when the ``M = N*H*W`` output pixels are few next to the output channels
    (measured on XLA:CPU in benchmarks/unet.py's configs: 2x faster at 8x8, even at 16x16
    with 256 channels, about 30% slower at 32x32 with 128).
    """
    return batch_pixels <= 2 * out_channels


def dot_kernel_grad(batch_pixels: int, out_channels: int) -> bool:
    """Whether the im2col matmul kernel gradient beats XLA's convolution.

    True when the ``M = N*H*W`` pixels are at most half the output channels, so the patches
    ``[M, kh*kw*I]`` are at most half the size of the kernel gradient itself. Measured on
    XLA:CPU (N = 2): with 512 -> 512 and 1024 -> 512 channels at 8x8, 1.1-1.2x faster on one
    core and 1.9x on two (XLA's kernel-gradient convolution does not use the second core
    there); even at 16x16 with 512 channels; 10-30% slower at 16x16 with 256 and at 32x32.
    """
    return 2 * batch_pixels <= out_channels


def _lax_same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw = kernel.shape[:2]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=NHWC)


def _col2im_input_grad(kernel: jax.Array, dy: jax.Array) -> jax.Array:
    """``d(same_conv)/dx`` applied to ``dy [N, H, W, O]`` as one matmul and a shifted tap sum."""
    n, h, w, o = dy.shape
    kh, kw, i, _ = kernel.shape
    ph, pw = kh // 2, kw // 2
    # taps[n, y, x, a, b, :] is what output pixel (y, x) sends back through kernel tap (a, b).
    taps = jnp.dot(dy.reshape(-1, o), kernel.reshape(-1, o).T).reshape(n, h, w, kh, kw, i)
    taps = jnp.pad(taps, ((0, 0), (ph, ph), (pw, pw), (0, 0), (0, 0), (0, 0)))
    # dx[y, x] = sum over taps (a, b) of taps[y + ph - a, x + pw - b, a, b] (zero outside).
    total = sum(taps[:, 2 * ph - a: 2 * ph - a + h, 2 * pw - b: 2 * pw - b + w, a, b, :]
                .astype(jnp.float32) for a in range(kh) for b in range(kw))
    return total.astype(dy.dtype)


def _im2col_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...]
                        ) -> jax.Array:
    """``d(same_conv)/dkernel`` (float32) for ``dy [N, H, W, O]``: the patches of ``x`` times
    ``dy``."""
    n, h, w, i = x.shape
    kh, kw = kernel_shape[:2]
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    # patches[m, (a*kw + b)*I + c] = x[pixel m shifted by tap (a, b), channel c] (zero outside)
    patches = jnp.concatenate([padded[:, a:a + h, b:b + w, :] for a in range(kh)
                               for b in range(kw)], axis=-1).reshape(n * h * w, kh * kw * i)
    grad = lax.dot_general(patches, dy.reshape(n * h * w, -1), (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
    return grad.reshape(kernel_shape)


@jax.custom_vjp
def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 convolution with ``(k - 1) / 2`` zero padding: x ``[N, H, W, I]``, kernel
    ``[kh, kw, I, O]`` (odd sizes) -> ``[N, H, W, O]``. The same function as
    ``lax.conv_general_dilated``; only the gradients' algorithms differ (module doc)."""
    return _lax_same_conv(x, kernel)


def _same_conv_fwd(x, kernel):
    return _lax_same_conv(x, kernel), (x, kernel)


def _flipped_input_grad(kernel: jax.Array, dy: jax.Array) -> jax.Array:
    """``d(same_conv)/dx`` applied to ``dy [N, H, W, O]`` as a forward 'same' convolution
    with the kernel flipped in space and its in / out axes swapped."""
    return _lax_same_conv(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))


def _correlation_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...]
                             ) -> jax.Array:
    """``d(same_conv)/dkernel`` for ``dy [N, H, W, O]`` as a forward 'valid' convolution: the
    zero-padded input with its channels as the batch and its batch as the features
    (``[I, H + kh - 1, W + kw - 1, N]``), correlated with ``dy`` read as an ``[H, W, N, O]``
    kernel, gives ``[I, kh, kw, O]``; one transpose makes it ``[kh, kw, I, O]``."""
    kh, kw = kernel_shape[:2]
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    grad = lax.conv_general_dilated(jnp.transpose(padded, (3, 1, 2, 0)),
                                    jnp.transpose(dy, (1, 2, 0, 3)), (1, 1), "VALID",
                                    dimension_numbers=NHWC, preferred_element_type=jnp.float32)
    return jnp.transpose(grad, (1, 2, 0, 3))


def _xla_grads(x: jax.Array, kernel: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """XLA's own gradient convolutions (every backend but the CPU)."""
    d_kernel = jax.vjp(lambda k: _lax_same_conv(x, k), kernel)[1](dy)[0]
    dx = jax.vjp(lambda v: _lax_same_conv(v, kernel), x)[1](dy)[0]
    return dx, d_kernel


def _cpu_grads(x: jax.Array, kernel: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward convolutions or matmuls, not XLA's gradient convolutions: XLA:CPU runs those
    30-50x slower inside the T2I step's scan over timesteps (module docstring)."""
    n, h, w, o = dy.shape
    pixels = n * h * w
    if dot_kernel_grad(pixels, o):
        d_kernel = _im2col_kernel_grad(x, dy, kernel.shape)
    else:
        d_kernel = _correlation_kernel_grad(x, dy, kernel.shape)
    if dot_input_grad(pixels, o):
        dx = _col2im_input_grad(kernel, dy)
    else:
        dx = _flipped_input_grad(kernel, dy)
    return dx, d_kernel.astype(kernel.dtype)


def _same_conv_bwd(residuals, dy):
    x, kernel = residuals
    # Chosen for the platform a program is lowered for, not the host's: an AOT compile for a
    # TPU from a CPU host (the planner) gets XLA's gradients, as the TPU will run them.
    return lax.platform_dependent(x, kernel, dy, cpu=_cpu_grads, default=_xla_grads)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (``nn.Conv(conv_general_dilated=...)``).

    Plain NHWC / HWIO stride-1 'same' convolutions of odd kernels go through ``same_conv``;
    every other case (strides, dilation, groups, asymmetric padding, explicit precision) is
    passed to ``lax.conv_general_dilated`` unchanged.
    """
    plain = (
        lhs.ndim == 4 and rhs.ndim == 4 and not kwargs and precision is None
        and feature_group_count == 1
        and tuple(window_strides) == (1, 1)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and rhs.shape[0] % 2 == 1 and rhs.shape[1] % 2 == 1
        and not isinstance(padding, str)
        and [tuple(p) for p in padding] == [(rhs.shape[0] // 2,) * 2, (rhs.shape[1] // 2,) * 2]
        and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )
    if plain:
        return same_conv(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
