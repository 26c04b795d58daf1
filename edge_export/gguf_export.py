"""The ``gguf`` format: the merged model as one GGUF file in llama.cpp's ``llama`` layout.

Stages (opened through the pipeline's ``stage``):

    export     hyper-parameters and tokenizer metadata as llama.cpp's converter writes them
               (``llama.*`` keys, ``tokenizer.ggml.*`` with a gpt2-style BPE vocabulary,
               merges, special ids and the chat template)
    lower      tensors renamed to llama.cpp's names (``blk.N.attn_q`` ...), Q and K rows
               permuted the way llama.cpp expects, cast to f32/f16 or quantised to Q8_0
    serialise  ``model.gguf`` written with ``gguf.GGUFWriter``

The Q/K permutation: Hugging Face Llama checkpoints order each head's rotary dimensions as
(first half, second half); llama.cpp interleaves them in pairs. Per head, rows
[0..d/2) and [d/2..d) become 0, d/2, 1, d/2+1, ...  (``_permute``; transformers applies the
inverse when it loads a GGUF). Norm weights stay f32 (as llama.cpp keeps 1-D tensors).

The runner loads the file back with transformers (``from_pretrained(dir, gguf_file=...)``),
so its speed figure is transformers' on a GGUF checkpoint, not llama.cpp's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from edgetune.edge_export.errors import ExportError
from edgetune.edge_export.options import ExportOptions, Stage
from edgetune.edge_export.parity import EagerRunner

__all__ = ["FORMAT", "GgufFormat", "gguf_runner", "tokenizer_fields"]

_HF_TO_GGUF = {  # Hugging Face per-layer suffix -> llama.cpp tensor kind
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_PRE_TOKENIZER_NAMES = {"digits+bytelevel": "smollm", "bytelevel": "gpt2"}


def _check_options(opts: ExportOptions) -> None:
    if opts.quantize not in ("none", "8bit"):
        raise ExportError(f"--quantize {opts.quantize}: the gguf format writes f32/f16 or 8bit (Q8_0) only")


def _check_architecture(model: LlamaForCausalLM) -> None:
    config = model.config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"gguf: RoPE type {rope_type!r} is not supported by this exporter (plain RoPE only)")
    if config.attention_bias or config.mlp_bias:
        raise ExportError("gguf: attention/MLP biases are not supported by this exporter")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError(f"gguf: head_dim {config.head_dim} x heads != hidden size {config.hidden_size}")


def _rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: (heads, 2, d/2, in) -> (heads, d/2, 2, in)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hparams(writer: object, model: LlamaForCausalLM, opts: ExportOptions) -> None:
    import gguf

    c = model.config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if opts.quantize == "8bit":
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    else:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if opts.float_type == "f16" else gguf.LlamaFileType.ALL_F32)


def _pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's pre-tokeniser name for the byte-level pre-tokenisers we know."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    key = "+".join(p.get("type", "").lower() for p in parts)
    if key not in _PRE_TOKENIZER_NAMES:
        raise ExportError(f"gguf: pre-tokeniser {key or 'none'!r} has no known llama.cpp name (byte-level BPE only)")
    return _PRE_TOKENIZER_NAMES[key]


def tokenizer_fields(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, object]:
    """The ``tokenizer.ggml.*`` values for a byte-level BPE tokenizer, in id order.

    Tokens beyond the tokenizer's length up to ``vocab_size`` are written as ``[PAD<id>]``
    (type UNUSED), as llama.cpp's converter does.

    Raises:
        ExportError: the tokenizer is not a byte-level BPE (``tokenizer.ggml.model = gpt2``).
    """
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ExportError(f"gguf: tokenizer model {state['model']['type']!r} is not supported (byte-level BPE only)")
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_tokens)
    added = {i: t.special or t.content in special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        if i not in id_to_token:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # added tokens: special ones are control tokens, as llama.cpp marks them
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer_name(tokenizer)}


def _tokenizer(writer: object, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    else:  # an empty array reads back as absent; transformers then derives merges from scores
        writer.add_token_scores([0.0] * len(fields["tokens"]))
    for name, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """llama.cpp name -> fp32 array, Q/K permuted; ``output`` left out when tied."""
    import gguf

    c = model.config
    names = {k: gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, v)] for k, v in _HF_TO_GGUF.items()}
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        array = tensor.detach().to(torch.float32).numpy()
        if hf_name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif hf_name == "model.norm.weight":
            out["output_norm.weight"] = array
        elif hf_name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["output.weight"] = array
        elif hf_name.startswith("model.layers.") and hf_name.endswith(".weight"):
            block, suffix = hf_name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            if suffix not in names:
                raise ExportError(f"gguf: tensor {hf_name} has no llama.cpp name (not a plain Llama?)")
            if suffix == "self_attn.q_proj":
                array = _permute(array, c.num_attention_heads)
            elif suffix == "self_attn.k_proj":
                array = _permute(array, c.num_key_value_heads)
            out[f"{names[suffix].format(bid=int(block))}.weight"] = array
        else:
            raise ExportError(f"gguf: unexpected tensor {hf_name} (not a plain Llama?)")
    return out


def _encode(name: str, array: np.ndarray, opts: ExportOptions) -> tuple[np.ndarray, object | None]:
    """Cast or quantise one tensor; 1-D tensors (norms) always stay f32."""
    import gguf

    if array.ndim == 1:
        return array.astype(np.float32), None
    if opts.quantize == "8bit":
        if array.shape[-1] % 32:
            return array.astype(np.float16), None  # Q8_0 needs rows in blocks of 32
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16 if opts.float_type == "f16" else np.float32), None


@dataclass(frozen=True)
class GgufFormat:
    """GGUF for llama.cpp and transformers (see the module docstring)."""

    name: str = "gguf"

    def check_options(self, opts: ExportOptions) -> None:
        """Reject 4-bit (only f32, f16 and Q8_0 are written)."""
        _check_options(opts)

    def export(
        self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, opts: ExportOptions, stage: Stage
    ) -> Path:
        """Write ``<out>/model.gguf`` and return its path."""
        import gguf

        _check_options(opts)
        _check_architecture(model)
        opts.out.mkdir(parents=True, exist_ok=True)
        artefact = opts.out / "model.gguf"
        writer = gguf.GGUFWriter(artefact, "llama")
        with stage("export"):
            writer.add_name(str(getattr(model.config, "_name_or_path", "") or "edgetune-export"))
            _hparams(writer, model, opts)
            _tokenizer(writer, tokenizer, model.config.vocab_size)
        with stage("lower"):
            for name, array in _gguf_tensors(model).items():
                data, raw_dtype = _encode(name, array, opts)
                writer.add_tensor(name, data, raw_dtype=raw_dtype)
        with stage("serialise"):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return artefact

    def load(self, artefact: Path) -> EagerRunner:
        """Load the GGUF back with transformers (de-quantised to fp32)."""
        return gguf_runner(artefact)


def gguf_runner(artefact: Path) -> EagerRunner:
    """transformers' model read from ``artefact``, driven like any runner."""
    import os

    from transformers import AutoModelForCausalLM

    os.environ["HF_HUB_OFFLINE"] = "1"  # a local file; never reach a hub
    model = AutoModelForCausalLM.from_pretrained(artefact.parent, gguf_file=artefact.name, dtype=torch.float32)
    if model.hf_quantizer is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.set_attn_implementation("eager")
    return EagerRunner(model)


FORMAT = GgufFormat()
