"""LoRA folded into the base weights for the rollout, and the rollout's eval mode.

LoRA: when the policy is a PeftModel whose LoRA weights are fp32, the rollout runs with each
adapter folded into its base weight (W + (alpha/r) B A, a new tensor; the original weight tensor
is put back afterwards, untouched), which removes the adapter's extra matmuls from every step.
bf16 weights are not folded: rounding W + dW to bf16 would lose most of a small dW.

`rollout_mode` also switches the model to eval mode and restores every module's training flag on
exit; `grpo.rollout.generate` runs inside it (and under `torch.inference_mode()`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# Rollout mode: eval, training flags restored, fp32 LoRA folded into the base weights
# ----------------------------------------------------------------------------------------------


def _foldable_lora_layers(model: torch.nn.Module) -> list[tuple[Any, str]]:
    """Plain LoRA Linear layers with one enabled, unmerged, fp32 adapter (others are left alone)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft not installed: nothing to fold
        return []
    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.disable_adapters or module.merged:
            continue
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
            continue
        if getattr(module, "lora_bias", {}).get(active[0], False):
            continue
        if module.base_layer.weight.dtype != torch.float32 or module.lora_A[active[0]].weight.dtype != torch.float32:
            continue
        layers.append((module, active[0]))
    return layers


@contextlib.contextmanager
def rollout_mode(model: torch.nn.Module, *, fold_lora: bool) -> Iterator[None]:
    """Eval mode (training flags of every module restored on exit) and, with `fold_lora`, fp32
    LoRA adapters folded into new base weight tensors (the original tensors are put back)."""
    training_flags = [(module, module.training) for module in model.modules()]
    folded: list[tuple[Any, Tensor]] = []
    model.eval()
    try:
        if fold_lora:
            with torch.no_grad():
                for layer, adapter in _foldable_lora_layers(model):
                    original = layer.base_layer.weight.data
                    layer.base_layer.weight.data = original + layer.get_delta_weight(adapter)
                    folded.append((layer, original))
                    # The layer now computes base_layer(x) only; peft's private flag avoids
                    # enable_adapters(), which would also flip requires_grad on the adapter.
                    layer._disable_adapters = True
        yield
    finally:
        for layer, original in folded:
            layer.base_layer.weight.data = original
            layer._disable_adapters = False
        for module, training in training_flags:
            module.training = training
