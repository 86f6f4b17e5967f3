"""The module that becomes the ONNX graph: raw PCM window in, one pooled MERT embedding out.

The encoder loop is ours (built from transformers' own submodules) so that it
stops at the deepest layer the pooling needs, and so that the pre-LayerNorm
final norm is applied the way the reference MERT code does (see
``reference.py``), not the way transformers 5.x reports hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm: (x - mean) / sqrt(var + 1e-7).
NORM_EPS = 1e-7
INT16_SCALE = 1.0 / 32768.0


class PooledMert(nn.Module):
    """``[B, window_samples]`` PCM (int16 or float32) → ``[B, hidden]`` float32.

    int16 input is scaled to [-1, 1) before the per-window normalisation. The
    normalisation is scale-invariant except for its epsilon; scaling first
    makes an int16 window and the same window as float give the same answer,
    even for near-silent windows.
    """

    def __init__(self, hubert: Any, layers: tuple[int, ...], input_dtype: str) -> None:
        super().__init__()
        config = hubert.config
        self.num_layers = int(config.num_hidden_layers)
        if not layers or min(layers) < 0 or max(layers) > self.num_layers:
            raise ValueError(f"layers {layers} outside 0..{self.num_layers}")
        self.selected = tuple(sorted(set(layers)))
        self.pre_layer_norm = bool(config.do_stable_layer_norm)
        self.int16_input = input_dtype == "int16"
        self.feature_extractor = hubert.feature_extractor
        self.feature_projection = hubert.feature_projection
        self.pos_conv_embed = hubert.encoder.pos_conv_embed
        self.encoder_layer_norm = hubert.encoder.layer_norm
        # Only the layers up to the deepest one pooled: the rest is never computed.
        self.layers = nn.ModuleList(list(hubert.encoder.layers)[: max(self.selected)])

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.to(torch.float32)
        if self.int16_input:
            x = x * INT16_SCALE
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = (centred * centred).mean(dim=-1, keepdim=True)
        x = centred / torch.sqrt(variance + NORM_EPS)

        features = self.feature_extractor(x).transpose(1, 2)
        hidden = self.feature_projection(features)
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.pre_layer_norm:
            hidden = self.encoder_layer_norm(hidden)

        pooled = []
        if 0 in self.selected:
            pooled.append(hidden.mean(dim=1))
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, attention_mask=None)
            if index in self.selected:
                state = hidden
                if self.pre_layer_norm and index == self.num_layers:
                    state = self.encoder_layer_norm(hidden)
                pooled.append(state.mean(dim=1))
        return torch.stack(pooled, dim=0).mean(dim=0)
