"""Build or load MERT as a transformers ``HubertModel`` (hub, local folder, random init).

MERT-v1 at inference is HuBERT (verified: same modules, same checkpoint keys),
so no ``trust_remote_code``: the checkpoint's ``config.json`` fields go into a
``HubertConfig`` and the tensors are loaded by us, safely
(safetensors, or ``torch.load(weights_only=True)``; never arbitrary pickles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mert_indexer.contract import DEFAULT_SAMPLE_RATE
from mert_indexer.errors import ConfigError, ExportError, WeightsUnavailableError

log = logging.getLogger(__name__)

# Architectures for --random-init. 95m is HubertConfig() itself.
# 330m: MERT-v1-330M's config.json (pre-LayerNorm, group-norm feature extractor).
# tiny: the same strides and kernels (75 Hz frames at 24 kHz), tiny widths, so
# that export + validation take seconds; it exists for tests.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "95m": {},
    "330m": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "do_stable_layer_norm": True,
    },
    "tiny": {
        "conv_dim": (32,) * 7,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
}

# The config.json fields that shape the inference graph; the rest (dropout,
# masking, CTC, CQT bins, ...) only matter for training.
ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "feat_extract_norm",
    "feat_extract_activation",
    "conv_dim",
    "conv_stride",
    "conv_kernel",
    "conv_bias",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "conv_pos_batch_norm",
    "do_stable_layer_norm",
    "feat_proj_layer_norm",
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class LoadedModel:
    """A ready HubertModel (eval mode, fp32) and what identifies it."""

    model: Any  # transformers.HubertModel
    model_id: str
    sample_rate: int
    weights_sha256: str
    random_init: bool

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def hubert_config(fields: dict[str, Any]) -> Any:
    """A ``HubertConfig`` for inference, with eager attention.

    Plain MatMul/Softmax is what exports and quantises.
    """
    from transformers import HubertConfig

    config = HubertConfig(**fields)
    config._attn_implementation = "eager"
    return config


def random_model(size: str, seed: int) -> LoadedModel:
    """The exact architecture, untrained: same cost as the real model, meaningless embeddings."""
    import torch
    from transformers import HubertModel

    if size not in ARCHITECTURES:
        raise ConfigError(f"unknown size {size!r}")
    torch.manual_seed(seed)
    model = HubertModel(hubert_config(dict(ARCHITECTURES[size]))).eval()
    return LoadedModel(
        model=model,
        model_id=f"random-init/mert-{size}/seed-{seed}",
        sample_rate=DEFAULT_SAMPLE_RATE,
        weights_sha256=state_dict_sha256(model.state_dict()),
        random_init=True,
    )


def load_model(source: str) -> LoadedModel:
    """Load from a local folder when ``source`` is one, else from the Hugging Face hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_local(path)
    if path.exists() or source.startswith((".", "/", "~")):
        raise WeightsUnavailableError(f"{source}: not a folder with a MERT checkpoint")
    return load_local(fetch_from_hub(source), model_id=source)


def fetch_from_hub(repo_id: str) -> Path:
    """``config.json`` and one weights file, from the local hub cache or the hub.

    One clear error if neither has them.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as exc:  # pragma: no cover - the [export] extra installs it
        raise WeightsUnavailableError(
            f"cannot fetch {repo_id}: huggingface_hub is not installed (pip install '.[export]')"
        ) from exc

    def download(local_only: bool) -> Path:
        config = Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only))
        for name in WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name, local_files_only=local_only)
                return config.parent
            except EntryNotFoundError:
                continue
        raise WeightsUnavailableError(f"{repo_id} has none of {', '.join(WEIGHT_FILES)}")

    alternatives = (
        "download the checkpoint elsewhere and pass its folder with --model DIR, "
        "or use --random-init for an untrained model of the same architecture"
    )
    with _quiet("huggingface_hub"):
        try:
            return download(local_only=True)
        except WeightsUnavailableError:
            raise
        except Exception as exc:
            log.debug("%s not in the local hub cache: %s", repo_id, exc)
        unreachable = None if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
        try:
            if unreachable:
                raise ConnectionError(unreachable)
            folder = download(local_only=False)
        except WeightsUnavailableError:
            raise
        except Exception as exc:
            text = str(exc).strip()
            reason = text.splitlines()[0][:160] if text else type(exc).__name__
            if constants.HF_HUB_OFFLINE:
                reason = "HF_HUB_OFFLINE is set and the files are not in the local cache"
            raise WeightsUnavailableError(
                f"cannot fetch {repo_id} from the Hugging Face hub ({reason}); " + alternatives
            ) from None
    log.info("fetched %s (weights licence: CC-BY-NC-4.0)", repo_id)
    return folder


def _unreachable(endpoint: str) -> str | None:
    """Why the hub clearly cannot be reached, or None.

    Saves huggingface_hub's ~25 s of retries offline.
    """
    if any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None  # a proxy resolves names for us
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}; offline?"
    return None


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's retry chatter for one call: the error we raise says it all."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_local(folder: Path, model_id: str | None = None) -> LoadedModel:
    """Load a MERT checkpoint folder: ``config.json`` (model_type mert_model) plus weights."""
    import torch
    from transformers import HubertModel

    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsUnavailableError(f"{config_path}: cannot read a model config ({exc})") from exc
    if raw.get("model_type") not in ("mert_model", "hubert"):
        raise WeightsUnavailableError(
            f"{config_path}: model_type is {raw.get('model_type')!r}, expected 'mert_model'"
        )
    if raw.get("feature_extractor_cqt"):
        raise ExportError(
            f"{config_path}: feature_extractor_cqt=true feeds CQT features into the encoder; "
            "only MERT-v1 checkpoints (CQT as a training target only) are supported"
        )
    if raw.get("deepnorm"):
        raise ExportError(f"{config_path}: deepnorm residual scaling is not supported")
    # attention_relax (330M) only rescales logits around their row maximum before
    # the softmax, which leaves the softmax unchanged; HuBERT's attention is exact.
    fields = {k: raw[k] for k in ARCH_KEYS if k in raw}
    config = hubert_config(fields)
    torch.manual_seed(0)
    model = HubertModel(config).eval()
    state = read_weights(folder)
    load_state(model, state, folder)
    name_or_path = str(raw.get("_name_or_path") or "")
    if model_id is None:
        looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/"))
        model_id = name_or_path if looks_like_hub_id else f"local/{folder.resolve().name}"
    sample_rate = int(raw.get("sample_rate", DEFAULT_SAMPLE_RATE))
    return LoadedModel(
        model=model,
        model_id=model_id,
        sample_rate=sample_rate,
        weights_sha256=state_dict_sha256(model.state_dict()),
        random_init=False,
    )


def read_weights(folder: Path) -> dict[str, Any]:
    """Tensors from ``model.safetensors`` or ``pytorch_model.bin`` (weights only, no code)."""
    import torch

    safetensors_path = folder / "model.safetensors"
    bin_path = folder / "pytorch_model.bin"
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            return dict(load_file(str(safetensors_path)))
        if bin_path.is_file():
            state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise WeightsUnavailableError(f"{bin_path}: not a state dict")
            return state
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # corrupt file, or a pickle that is more than tensors
        raise WeightsUnavailableError(f"{folder}: cannot read weights safely: {exc}") from exc
    raise WeightsUnavailableError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def load_state(model: Any, state: dict[str, Any], folder: Path) -> None:
    """Copy checkpoint tensors into ``model``; every model key must be there.

    Renames: a ``mert_model.``/``hubert.`` prefix is dropped, and the old
    weight-norm names (``weight_g``/``weight_v``) map to the parametrization
    names. Extra checkpoint keys (CQT branch, training heads) are ignored and
    listed in the log.
    """
    import torch

    wanted = model.state_dict()
    renamed: dict[str, Any] = {}
    for key, tensor in state.items():
        for prefix in ("mert_model.", "hubert.", "model."):
            if key.startswith(prefix) and key[len(prefix) :] in wanted:
                key = key[len(prefix) :]
                break
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        renamed[key] = tensor
    # masked_spec_embed is a training-only parameter (SpecAugment); absent is fine.
    missing = [k for k in wanted if k not in renamed and k != "masked_spec_embed"]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise WeightsUnavailableError(f"{folder}: checkpoint lacks encoder weights: {shown}")
    ignored = sorted(k for k in renamed if k not in wanted)
    if ignored:
        log.info(
            "ignoring %d checkpoint keys not used at inference: %s",
            len(ignored),
            ", ".join(ignored[:8]),
        )
    with torch.no_grad():
        for key, target in wanted.items():
            if key not in renamed:
                continue
            source = renamed[key]
            if tuple(source.shape) != tuple(target.shape):
                raise WeightsUnavailableError(
                    f"{folder}: {key} has shape {tuple(source.shape)}, "
                    f"the config implies {tuple(target.shape)}"
                )
            target.copy_(source.to(torch.float32))


def state_dict_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in sorted key order.

    The same weights give the same hash whatever the precision of the export,
    so fp16 and INT8 exports of one checkpoint share an index.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
