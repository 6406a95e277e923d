"""What the planner knows about TPU chips, and the analytic FLOPs of a UNet forward pass.

``CHIPS`` holds each generation's HBM, peak bfloat16 FLOP/s, HBM bandwidth and inter-chip
bandwidth as Cloud TPU's system-architecture pages publish them (the planner prints the figures
it used; ``--chip_tflops`` / ``--hbm_gbs`` / ``--ici_gbs`` override them). ``phase_seconds`` is the
roofline: a phase takes at least its FLOPs over the peak and its HBM traffic over the bandwidth,
plus the gradient all-reduce over the interconnect. ``unet_forward_flops`` counts the
multiply-adds of a ``UNet2DConditionModel`` from its config, independently of XLA, so the
planner's counts can be checked against it.
"""

from __future__ import annotations

import dataclasses

from parrot_jax.models.unet import UNetConfig

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU chip: HBM (GiB), peak bf16 TFLOP/s, HBM GB/s, inter-chip (ICI) GB/s per chip
    (None: not published here; the roofline then says so)."""

    name: str
    hbm_gib: float
    bf16_tflops: float | None = None
    hbm_gbs: float | None = None
    ici_gbs: float | None = None

    def describe(self) -> str:
        fig = lambda v, unit: "?" if v is None else f"{v:g} {unit}"  # noqa: E731
        return (f"{self.name}: {self.hbm_gib:g} GiB HBM, {fig(self.bf16_tflops, 'TFLOP/s')} "
                f"bf16, {fig(self.hbm_gbs, 'GB/s')} HBM, {fig(self.ici_gbs, 'GB/s')} ICI")


# By the device_kind libtpu reports. ICI: the per-chip interconnect bandwidth in Gbit/s / 8.
CHIPS = {
    "TPU v2": ChipSpec("v2", 8),
    "TPU v3": ChipSpec("v3", 16),
    "TPU v4": ChipSpec("v4", 32, 275, 1200, 300),
    "TPU v5 lite": ChipSpec("v5e", 16, 197, 819, 200),
    "TPU v5": ChipSpec("v5p", 95, 459, 2765, 600),
    "TPU v5p": ChipSpec("v5p", 95, 459, 2765, 600),
    "TPU v6 lite": ChipSpec("v6e", 32, 918, 1640, 448),
    "TPU v6e": ChipSpec("v6e", 32, 918, 1640, 448),
    "TPU7x": ChipSpec("tpu7x", 192),
}


def phase_seconds(flops: float, bytes_accessed: float, allreduce_bytes: float,
                  chip: ChipSpec) -> float | None:
    """Roofline seconds of one phase on one chip: ``max(flops / peak, bytes / HBM bandwidth)``
    plus ``allreduce_bytes`` over the interconnect; None without the chip's figures."""
    if chip.bf16_tflops is None or chip.hbm_gbs is None:
        return None
    compute = max(flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gbs * 1e9))
    if allreduce_bytes and chip.ici_gbs is None:
        return None
    return compute + (allreduce_bytes / (chip.ici_gbs * 1e9) if allreduce_bytes else 0.0)


def ring_allreduce_bytes(nbytes: float, chips: int) -> float:
    """Bytes each chip sends in a ring all-reduce of ``nbytes``: ``2 (n - 1) / n`` of them."""
    return 0.0 if chips <= 1 else 2.0 * (chips - 1) / chips * nbytes


# --- analytic FLOPs ----------------------------------------------------------------------------

def _conv(h: int, w: int, cin: int, cout: int, k: int) -> float:
    return 2.0 * h * w * cin * cout * k * k


def _resnet(h: int, w: int, cin: int, cout: int, temb: int) -> float:
    shortcut = _conv(h, w, cin, cout, 1) if cin != cout else 0.0
    return _conv(h, w, cin, cout, 3) + _conv(h, w, cout, cout, 3) + shortcut + 2.0 * temb * cout


def _transformer(h: int, w: int, c: int, depth: int, context: int, context_dim: int) -> float:
    t = h * w
    block = (4 * 2.0 * t * c * c + 2 * 2.0 * t * t * c  # self-attention: q k v out, scores, values
             + 2 * 2.0 * t * c * c + 2 * 2.0 * context * context_dim * c  # cross: q out, k v
             + 2 * 2.0 * t * context * c  # cross scores, values
             + 2.0 * t * c * 8 * c + 2.0 * t * 4 * c * c)  # GEGLU feed-forward
    return 2 * 2.0 * t * c * c + depth * block  # proj_in, proj_out


def unet_forward_flops(cfg: UNetConfig, height: int, width: int, context: int) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass through the UNet's convolutions,
    projections and attention products, at latent ``height x width`` with ``context`` text
    tokens; norms, activations and the time embedding's sinusoid are left out (< 1%)."""
    n, temb = len(cfg.block_out_channels), cfg.time_dim
    attn = [kind.startswith("CrossAttn") for kind in cfg.down_block_types]
    h, w, c = height, width, cfg.block_out_channels[0]
    total = _conv(h, w, cfg.in_channels, c, cfg.conv_in_kernel)
    total += 2.0 * c * temb + 2.0 * temb * temb
    skips = [c]
    for i, out in enumerate(cfg.block_out_channels):
        for _ in range(cfg.layers_per_block[i]):
            total += _resnet(h, w, c, out, temb)
            c = out
            if attn[i]:
                total += _transformer(h, w, c, cfg.transformer_layers_per_block[i], context,
                                      cfg.cross_attention_dim[i])
            skips.append(c)
        if i < n - 1:
            h, w = h // 2, w // 2
            total += _conv(h, w, c, c, 3)
            skips.append(c)
    if cfg.mid_block_type is not None:
        total += 2 * _resnet(h, w, c, c, temb) + _transformer(
            h, w, c, cfg.transformer_layers_per_block[-1], context, cfg.cross_attention_dim[-1])
    up_attn = [kind.startswith("CrossAttn") for kind in cfg.up_block_types]
    for i, out in enumerate(reversed(cfg.block_out_channels)):
        level = n - 1 - i
        for _ in range(cfg.layers_per_block[level] + 1):
            total += _resnet(h, w, c + skips.pop(), out, temb)
            c = out
            if up_attn[i]:
                total += _transformer(h, w, c, cfg.transformer_layers_per_block[level], context,
                                      cfg.cross_attention_dim[level])
        if i < n - 1:
            h, w = 2 * h, 2 * w
            total += _conv(h, w, c, c, 3)
    return total + _conv(h, w, c, cfg.out_channels, cfg.conv_out_kernel)
