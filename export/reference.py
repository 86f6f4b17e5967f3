"""The embeddings every export is checked against, computed the reference way.

Independent of ``graph.py``: MERT's own feature extractor normalisation
(transformers' ``Wav2Vec2FeatureExtractor``), the full ``HubertModel`` forward
with ``output_hidden_states``, and the reference MERT convention for pre-LN
models (MERT-v1-330M): the encoder's final LayerNorm is applied to the last
hidden state. transformers 5.x reports the last hidden state *before* that
norm (``last_hidden_state`` has it), so it is substituted here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INT16_SCALE = 1.0 / 32768.0


def as_float_pcm(audio: np.ndarray) -> np.ndarray:
    """int16 PCM to float32 in [-1, 1); float input unchanged."""
    if audio.dtype == np.int16:
        return audio.astype(np.float32) * np.float32(INT16_SCALE)
    return audio.astype(np.float32, copy=False)


def reference_embeddings(
    hubert: Any, audio: np.ndarray, layers: tuple[int, ...], batch_size: int = 4
) -> np.ndarray:
    """``[N, hidden]`` float32: per window, mean over time of each selected hidden state, then over layers."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor

    pcm = as_float_pcm(audio)
    normalised = np.stack(
        Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm(list(pcm), attention_mask=None)
    ).astype(np.float32)
    pre_ln = bool(hubert.config.do_stable_layer_norm)
    out = []
    with torch.inference_mode():
        for start in range(0, len(normalised), batch_size):
            batch = torch.from_numpy(normalised[start : start + batch_size])
            result = hubert(batch, output_hidden_states=True)
            states = list(result.hidden_states)
            if pre_ln:
                states[-1] = result.last_hidden_state
            pooled = torch.stack([states[i].mean(dim=1) for i in layers], dim=0).mean(dim=0)
            out.append(pooled.numpy())
    return np.concatenate(out).astype(np.float32)
