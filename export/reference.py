"""The embeddings every export is checked against, computed the reference way.

Independent of ``graph.py``: MERT's own feature extractor normalisation
(transformers' ``Wav2Vec2FeatureExtractor``), the full ``HubertModel`` forward
with ``output_hidden_states``, and the reference MERT convention for pre-LN
models (MERT-v1-330M): the encoder's final LayerNorm is applied to the last
hidden state. transformers 5.x reports the last hidden state *before* that
norm (``last_hidden_state`` has it), so it is substituted here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.atomic import atomic_write

log = logging.getLogger(__name__)

INT16_SCALE = 1.0 / 32768.0


def as_float_pcm(audio: np.ndarray) -> np.ndarray:
    """int16 PCM to float32 in [-1, 1); float input unchanged."""
    if audio.dtype == np.int16:
        return audio.astype(np.float32) * np.float32(INT16_SCALE)
    return audio.astype(np.float32, copy=False)


def reference_embeddings(
    hubert: Any, audio: np.ndarray, layers: tuple[int, ...], batch_size: int = 4
) -> np.ndarray:
    """``[N, hidden]`` float32 reference embeddings.

    Per window: the mean over time of each selected hidden state, then over layers.
    """
    import torch
    from transformers import Wav2Vec2FeatureExtractor

    pcm = as_float_pcm(audio)
    normalised = np.stack(
        Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm(
            list(pcm),
            attention_mask=None,  # type: ignore[arg-type]  # None is its documented default
        )
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


# --- the gate reference: PyTorch proves the fp32 ONNX, the fp32 ONNX does the bulk -------------

CACHE_ENV = "MERT_EXPORT_CACHE"  # a folder, or "off"


@dataclass(frozen=True)
class GateReference:
    """What a fp16/int8 candidate is gated against, and how it was obtained."""

    embeddings: np.ndarray  # [N, hidden]: the fp32 ONNX model in ONNX Runtime
    parity_windows: int  # windows on which the fp32 ONNX was checked against PyTorch
    parity_max_rel_l2: float
    cached: bool


def gate_reference(
    hubert: Any,
    weights_sha256: str,
    fp32_path: Path,
    audio: np.ndarray,
    layers: tuple[int, ...],
    parity_windows: int,
) -> GateReference:
    """The reference for the fp16/int8 gates over all of ``audio``, in the fastest correct runtime.

    PyTorch (the independent reference) runs on the first ``parity_windows``
    windows; the fp32 ONNX model must match it there within the fp32 gate
    (relative L2 <= 1e-4, else :class:`ValidationError`), and is then used for
    every window: ONNX Runtime is faster than PyTorch eager on CPU, and the
    differences it may carry (~5e-6 relative) are far below what the fp16/int8
    gates can see. Both parts are cached per weights, layers, window audio and
    library versions (``$MERT_EXPORT_CACHE``, default ``~/.cache/mert-indexer``;
    ``off`` disables), so exporting a second precision of the same weights
    reuses them; the parity check itself always runs on the new file.
    """
    from export import validate

    key = _cache_key(weights_sha256, audio, layers)
    cached = _load(key)
    torch_ref = cached.get("torch") if cached else None
    if torch_ref is None or len(torch_ref) != parity_windows:
        log.info("computing the PyTorch reference on %d validation windows", parity_windows)
        started = time.monotonic()
        torch_ref = reference_embeddings(hubert, audio[:parity_windows], layers)
        log.info("PyTorch reference: %.1f s", time.monotonic() - started)
    session = validate.session(fp32_path)
    onnx_first = validate.run(session, audio[:parity_windows])
    parity = validate.gate("fp32", onnx_first, torch_ref)  # raises when the fp32 ONNX is off
    full = cached.get("onnx") if cached else None
    reused = full is not None and len(full) == len(audio)
    if reused:
        assert full is not None
        # The cached bulk came from an earlier fp32 ONNX of the same weights; this one must
        # agree with it as closely as with PyTorch, or it is recomputed.
        reused = float(validate.rel_l2(onnx_first, full[:parity_windows]).max()) < 1e-5
    if not reused:
        log.info(
            "computing the fp32 reference on %d more windows with the fp32 ONNX model "
            "(ONNX Runtime; matches PyTorch to %.1e on the first %d)",
            len(audio) - parity_windows,
            parity.max_rel_l2,
            parity_windows,
        )
        started = time.monotonic()
        rest = validate.run(session, audio[parity_windows:])
        log.info("fp32 ONNX reference: %.1f s", time.monotonic() - started)
        full = np.concatenate([onnx_first, rest]).astype(np.float32)
    else:
        log.info("reusing the cached fp32 reference for %d windows", len(audio))
    assert full is not None
    _store(key, {"torch": torch_ref, "onnx": full})
    return GateReference(full, parity_windows, parity.max_rel_l2, reused)


def _cache_dir() -> Path | None:
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mert-indexer" / "export-references"


def _cache_key(weights_sha256: str, audio: np.ndarray, layers: tuple[int, ...]) -> str:
    import onnxruntime
    import torch
    import transformers

    digest = hashlib.sha256()
    for part in (
        weights_sha256,
        ",".join(map(str, layers)),
        str(audio.dtype),
        str(audio.shape),
        torch.__version__,
        transformers.__version__,
        onnxruntime.__version__,
    ):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(audio).tobytes())
    return digest.hexdigest()[:32]


def _load(key: str) -> dict[str, np.ndarray] | None:
    folder = _cache_dir()
    if folder is None or not (folder / f"{key}.npz").is_file():
        return None
    try:
        with np.load(folder / f"{key}.npz") as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable reference cache entry (%s)", exc)
        return None


def _store(key: str, arrays: dict[str, np.ndarray]) -> None:
    folder = _cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"{key}.npz", "wb") as fh:
            np.savez(fh, **arrays)
    except OSError as exc:  # a cache must never fail an export
        log.warning("could not write the reference cache in %s (%s)", folder, exc)
