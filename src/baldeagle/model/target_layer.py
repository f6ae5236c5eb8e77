"""A draft's decoder layer initialised from one of the target's decoder layers (`init_from_target_layer`).

The draft's one layer is a Llama decoder layer with the target's own shapes (`draft_config.py`), so
a target layer's weights fit it, with one change of shape for EAGLE-3:

- EAGLE-1 (`layers.0`): q/k/v/o, the MLP and post_attention_layernorm are copied as they are. The
  draft layer has no input norm (the fc output goes straight into attention), so the target's
  input_layernorm has no counterpart and is left out.
- EAGLE-3 (`midlayer`): q/k/v read 2H, [input_layernorm(embedding); hidden_norm(feature)]. The
  target's q/k/v weights [out, H] go into the feature half (columns H:2H) and the embedding half
  (columns 0:H) starts at zero; hidden_norm takes the target layer's input_layernorm. The feature
  h = fc(g) is the layer's residual stream, as the target layer's input is its own, so at
  initialisation the draft layer computes exactly the target layer on h: the same normalised input
  into the same attention, the same o_proj, post-attention norm and MLP. The embedding columns learn
  from the first step (their gradient is not zero: the normalised embedding they multiply is not);
  input_layernorm (the embedding's norm) keeps its initial ones.
- A bias the draft has and the target layer lacks (o_proj's, when a Qwen2 target's q/k/v biases
  give the draft Llama's attention_bias) starts at zero, which computes what the target layer does.
- Anything else in the target layer (Qwen3's q/k norms, a mixture-of-experts block's router and
  experts, a bias the draft lacks), or a weight of another shape, is an error naming the layer and
  the weight, raised before anything is copied.
"""

from __future__ import annotations

import torch
from torch import nn

QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
COPIED = frozenset({
    *QKV, "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight",
})


def target_decoder_layers(target_model) -> nn.ModuleList:
    """The target's decoder layers (`get_decoder().layers`: Llama, Qwen, Mistral and their MoE kin)."""
    decoder = target_model.get_decoder() if hasattr(target_model, "get_decoder") else target_model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(target_model).__name__} "
                         "(no get_decoder().layers) to initialise the draft's layer from")
    return layers


def _misfit(index: int, detail: str) -> ValueError:
    return ValueError(f"init_from_target_layer={index}: the target's decoder layer {index} does not fit the "
                      f"draft's layer: {detail}; choose another layer or init_from_target_layer=-1")


def target_layer_weights(target_model, index: int, draft_type: str) -> dict[str, torch.Tensor]:
    """Target layer `index`'s parameters under the draft layer's names (input_layernorm → EAGLE-3's
    hidden_norm, left out for EAGLE-1); any other weight the draft has no place for is an error."""
    layers = target_decoder_layers(target_model)
    if not 0 <= index < len(layers):
        raise ValueError(f"init_from_target_layer={index}: the target has {len(layers)} decoder layers "
                         f"(0..{len(layers) - 1})")
    weights = {}
    for name, tensor in layers[index].named_parameters():
        if name == "input_layernorm.weight":
            if draft_type == "eagle3":
                weights["hidden_norm.weight"] = tensor.detach()
            continue
        if name not in COPIED:
            raise _misfit(index, f"{name} {list(tensor.shape)} has no counterpart in a draft layer (q/k norms, "
                                 "mixture-of-experts blocks and other biases are not part of it)")
        weights[name] = tensor.detach()
    return weights


def _initial_value(name: str, param: torch.Tensor, weights: dict, index: int, draft_type: str):
    """What draft layer parameter `name` starts as: a tensor of its shape, or None (kept as built)."""
    source = weights.get(name)
    if source is None:
        if draft_type == "eagle3" and name == "input_layernorm.weight":
            return None  # the embedding's norm: the target layer has no counterpart
        if name.endswith(".bias"):
            return torch.zeros_like(param)  # a bias the target layer lacks: zero computes the same
        raise _misfit(index, f"the draft's {name} has no counterpart in it")
    if draft_type == "eagle3" and name in QKV:
        hidden = param.shape[1] // 2
        if tuple(source.shape) != (param.shape[0], hidden):
            raise _misfit(index, f"{name} is {list(source.shape)}, the draft's feature half is "
                                 f"{[param.shape[0], hidden]}")
        value = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
        value[:, hidden:].copy_(source)  # [embedding half = 0 | feature half = the target's]
        return value
    if source.shape != param.shape:
        raise _misfit(index, f"{name} is {list(source.shape)}, the draft's is {list(param.shape)}")
    return source


def init_layer_from_target(layer: nn.Module, target_model, index: int, draft_type: str) -> None:
    """Set the draft's decoder layer (EAGLE-1 `layers[0]`, EAGLE-3 `midlayer`) from target layer
    `index`, as the module notes say; every check runs before the first weight is written."""
    weights = target_layer_weights(target_model, index, draft_type)
    params = dict(layer.named_parameters())
    extra = [name for name in weights if name not in params]  # a q/k/v bias, in a draft without attention_bias
    if extra:
        raise _misfit(index, f"{extra[0]} {list(weights[extra[0]].shape)} has no counterpart in the draft's layer")
    values = {name: _initial_value(name, param, weights, index, draft_type) for name, param in params.items()}
    with torch.no_grad():
        for name, value in values.items():
            if value is not None:
                params[name].copy_(value)
