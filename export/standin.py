"""The trained stand-in for MERT: its identity, architecture, track split and checkpoint format.

Random-init MERT is not shift tolerant, so search quality cannot be measured
with it, and the real weights may be unreachable (CC-BY-NC-4.0, hub access).
The stand-in is a *small* model of the same architecture (transformers'
``HubertModel``: MERT's conv strides and kernels, so 320-sample hop and 75 Hz
frames at 24 kHz), trained contrastively for identification
(``standin_train.py``). It is NOT MERT: its model id reads ``standin/...``
wherever the contract carries it, and its embeddings only mean "this audio".

The checkpoint is a folder in MERT's own format (``config.json`` with
``model_type: mert_model`` and the HubertConfig architecture fields,
``model.safetensors``), so ``export/to_onnx.py --model DIR`` exports it through
the real-weights path unchanged; ``training.json`` beside it says how it was
made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.mert import ARCH_KEYS
from mert_indexer.atomic import atomic_write_bytes, atomic_write_text
from mert_indexer.contract import DEFAULT_SAMPLE_RATE, DEFAULT_WINDOW_SECONDS
from mert_indexer.errors import ExportError

# load_local takes a "<owner>/<name>" _name_or_path as the model id verbatim.
NAME = "fdrpg-fingerprint-v1"
MODEL_ID = f"standin/{NAME}"
COMMITTED = Path(__file__).resolve().parent / "standin"

SAMPLE_RATE = DEFAULT_SAMPLE_RATE  # 24 kHz, as MERT
WINDOW_SAMPLES = round(DEFAULT_WINDOW_SECONDS * SAMPLE_RATE)  # what the export serves
HOP_SAMPLES = 320  # MERT's conv stack: 5 * 2**6; 75 Hz frames

# HubertConfig fields: MERT's conv strides and kernels (the defaults), narrow
# widths, two transformer layers; dropouts and layerdrop off (their masks would
# cost time and make the training depend on more random draws).
ARCHITECTURE: dict[str, Any] = {
    "conv_dim": [32, 32, 64, 64, 128, 128, 128],
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 8,
}
TRAINING_ONLY: dict[str, Any] = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
    "layerdrop": 0.0,
}

# freedroidrpg-data's 16 tracks (scripts/get_music.sh), by file stem. The
# held-apart six are never trained on; evaluations report them separately.
# Chosen once by hand to span the styles (ambient, battle, menu, town).
TRAIN_TRACKS = (
    "AmbientBattle",
    "Bleostrada",
    "HellFortressEntrance",
    "HellFortressTwo",
    "ImperialArmy",
    "NewTutorialStage",
    "TechBattle",
    "hellforce",
    "temple",
    "underground",
)
HELD_OUT_TRACKS = ("Ambience", "Hyperbattle", "Suspicion", "TheBeginning", "menu", "town")

README_NOTE = (
    "STAND-IN, NOT MERT: a small HuBERT-architecture model trained contrastively "
    "on freedroidrpg-data music for shift-tolerant identification; for measuring "
    "search quality only"
)


def build_model(seed: int) -> Any:
    """A freshly initialised stand-in ``HubertModel`` (train mode), seeded."""
    import torch
    from transformers import HubertModel

    from export.mert import hubert_config

    torch.manual_seed(seed)
    return HubertModel(hubert_config({**ARCHITECTURE, **TRAINING_ONLY}))


def config_json(model: Any) -> dict[str, Any]:
    """MERT's config format: model_type mert_model, architecture fields, sample rate, identity."""
    full = model.config.to_dict()
    out: dict[str, Any] = {
        "_name_or_path": MODEL_ID,
        "model_type": "mert_model",
        "architectures": ["HubertModel"],
        "standin": README_NOTE,
        "sample_rate": SAMPLE_RATE,
    }
    out.update({key: full[key] for key in ARCH_KEYS if key in full})
    return out


def weights(model: Any) -> dict[str, Any]:
    """The tensors ``export.mert.load_local`` expects (HubertModel's own keys, fp32, contiguous).

    ``masked_spec_embed`` (SpecAugment, training only, never trained here) is left out.
    """
    return {
        key: tensor.detach().to("cpu").contiguous().clone()
        for key, tensor in model.state_dict().items()
        if key != "masked_spec_embed"
    }


def write_checkpoint(folder: Path, model: Any, training: dict[str, Any]) -> dict[str, Any]:
    """Write the folder, load it back as the export will, and return ``training`` as written.

    Each file is written atomically: the weights, then the config (a folder
    with a config always has its weights), then ``training.json`` with the
    model id and weights hash the export will report. The folder is checked
    first: ``export.mert.load_local`` must load it with the stand-in id and
    reproduce the trained model's embeddings, or :class:`ExportError`.
    """
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "model_id": MODEL_ID}
    atomic_write_bytes(folder / "model.safetensors", save(weights(model), metadata=metadata))
    atomic_write_text(folder / "config.json", json.dumps(config_json(model), indent=2) + "\n")
    loaded = verify(folder, model)
    written = {"model_id": loaded.model_id, "weights_sha256": loaded.weights_sha256, **training}
    atomic_write_text(folder / "training.json", json.dumps(written, indent=2) + "\n")
    return written


def verify(folder: Path, model: Any) -> Any:
    """``load_local(folder)``, checked: stand-in id, and ``model``'s pooled output on test audio."""
    import numpy as np
    import torch

    from export.graph import PooledMert
    from export.mert import load_local

    loaded = load_local(folder)
    if loaded.model_id != MODEL_ID:
        raise ExportError(f"{folder}: loads as {loaded.model_id!r}, expected {MODEL_ID!r}")
    layers = tuple(range(loaded.num_layers + 1))
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, WINDOW_SAMPLES))
    x = torch.from_numpy(audio.astype(np.float32))
    was_training = model.training
    with torch.no_grad():
        trained = PooledMert(model.eval(), layers, "float32")(x)
        reloaded = PooledMert(loaded.model, layers, "float32")(x)
    model.train(was_training)
    error = float(torch.linalg.norm(trained - reloaded) / torch.linalg.norm(trained))
    if not error < 1e-5:
        raise ExportError(f"{folder}: reloaded model differs from the trained one ({error:.1e})")
    return loaded
