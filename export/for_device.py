"""`edge export --device NAME`: quantization defaults for a target board.

    weights at int8 ≈ parameters x 1 byte
    int8  if they fill at most half of the device's usable RAM (the better quality, and room is left
          for the KV cache, the runtime and the rest of the robot's software)
    int4  otherwise (for MoE models also halves the bytes read per expert-cache miss)

Block sizes are the exporter's defaults for that quantization (ExportOptions.policy: int8 16, int4
32, an int4 MoE's experts 64). An explicit --quant or --block-size wins over these.
"""
from __future__ import annotations

from edge.devices import Device

from .arch import describe


def estimate_parameters(arch) -> int:
    s = arch.spec
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attention = s.hidden_size * (2 * q + 2 * kv)
    if arch.moe:
        sparse = len(arch.moe.sparse_layers)
        mlp = 3 * s.hidden_size * (sparse * arch.moe.num_experts * arch.moe.expert_intermediate_size
                                   + (s.num_layers - sparse) * s.intermediate_size)
    else:
        mlp = 3 * s.hidden_size * s.intermediate_size * s.num_layers
    embed = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    return attention * s.num_layers + mlp + embed


def device_defaults(config: dict, device: Device) -> tuple[str, str]:
    """(quant, why) for a checkpoint config on `device`."""
    n = estimate_parameters(describe(config))
    int8_mb = n / 2**20
    if int8_mb <= device.usable_mb / 2:
        return "int8", f"{n / 1e6:.0f}M parameters at int8 ({int8_mb:.0f} MB) fit in half of {device.name}'s {device.usable_mb} MB"
    return "int4", (f"{n / 1e6:.0f}M parameters at int8 ({int8_mb:.0f} MB) would take more than half of "
                        f"{device.name}'s {device.usable_mb} MB: int4")
