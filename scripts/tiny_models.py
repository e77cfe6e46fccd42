"""Tiny GGUF models with random weights, one per architecture the engine runs beyond its two
shipped models, for the golden tests in crates/engine/src/golden.rs (no model download):

  python tiny_models.py OUT_DIR

Each file has two layers of random weights in real GGUF quantization types (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, which the `gguf` package's writer quantizes, and Q4_K, the most used k-quant, which
it cannot: `quantize_q4_k` below writes it, checked against the package's own Q4_K reader) and the real
tokenizer of its family, borrowed from llama.cpp's vocabulary-only GGUFs
(`models/ggml-vocab-*.gguf`, with llama.cpp's tokenizer test vectors beside them, kept in
OUT_DIR/vocab/), which ship inside the llama-cpp-python source package on PyPI.
The weights come from a seeded generator, so the same versions of numpy and gguf write the same
bytes (the golden fixtures record each file's SHA-256). scripts/tiny-models.sh pins them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import urllib.parse
import urllib.request

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as Q, GGUFValueType, quants

# The source package the vocabularies come from, and its SHA-256.
SDIST = ("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
VOCABS = ["qwen2", "llama-bpe", "phi-3"]

# name: (architecture, vocabulary, hyper-parameters, weight types, extras)
MODELS = {
    # Qwen2/2.5: Q/K/V biases, RoPE on halves, tied embeddings.
    "tiny-qwen2": dict(arch="qwen2", vocab="qwen2", hidden=128, heads=4, kv_heads=2, head_dim=32,
                       ffn=384, rope_base=1_000_000.0, tied=True, attn=Q.Q8_0, ffn_type=Q.Q4_0,
                       embd=Q.Q8_0, bias=True),
    # Qwen3: per-head Q/K RMS norms, head width apart from hidden / heads, own output matrix.
    "tiny-qwen3": dict(arch="qwen3", vocab="qwen2", hidden=128, heads=4, kv_heads=2, head_dim=64,
                       ffn=384, rope_base=1_000_000.0, tied=False, attn=Q.Q4_1, ffn_type=Q.Q5_0,
                       embd=Q.Q8_0, qk_norm=True),
    # Llama 3.x: the llama architecture with Llama 3's tokenizer and RoPE frequency factors.
    "tiny-llama3": dict(arch="llama", vocab="llama-bpe", hidden=128, heads=4, kv_heads=1,
                        head_dim=32, ffn=512, rope_base=500_000.0, tied=True, attn=Q.Q5_1,
                        ffn_type=Q.Q4_0, embd=Q.Q8_0, rope_freqs=True,
                        # As in Llama 3's Q4_K_M files (k-quant rows are 256 values wide).
                        down_type=Q.Q4_K),
    # Phi-3: fused QKV and gate/up matrices, SentencePiece with a space prefix.
    "tiny-phi3": dict(arch="phi3", vocab="phi-3", hidden=128, heads=4, kv_heads=4, head_dim=32,
                      ffn=256, rope_base=10_000.0, tied=False, attn=Q.Q8_0, ffn_type=Q.Q4_1,
                      embd=Q.Q5_1, fused=True),
}

LAYERS = 2
CONTEXT = 4096

# Llama 3's chat format (its vocabulary file has no template): header markers around the role,
# contents trimmed, each turn closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def fetch_vocabs(cache: str) -> dict[str, str]:
    """The vocabulary GGUFs, extracted once from the source package into `cache`."""
    paths = {v: os.path.join(cache, f"ggml-vocab-{v}.gguf") for v in VOCABS}
    # With each vocabulary, llama.cpp's own tokenizer test vectors (texts and their ids).
    files = [p + ext for p in paths.values() for ext in ("", ".inp", ".out")]
    if all(os.path.exists(f) for f in files):
        return paths
    os.makedirs(cache, exist_ok=True)
    name, version, digest = SDIST
    api = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(api, timeout=120) as r:
        meta = json.load(r)
    (entry,) = [u for u in meta["releases"][version] if u["packagetype"] == "sdist"]
    url = urllib.parse.urljoin(api, entry["url"])
    tmp = os.path.join(cache, "sdist.tar.gz")
    print(f"downloading {name} {version} (for its vocabulary files) ...", file=sys.stderr)
    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            sha.update(chunk)
            f.write(chunk)
    if sha.hexdigest() != digest:
        raise SystemExit(f"{url}: checksum differs from PyPI's")
    with tarfile.open(tmp) as tar:
        for path in files:
            member = f"llama_cpp_python-{version}/vendor/llama.cpp/models/{os.path.basename(path)}"
            with tar.extractfile(member) as src, open(path + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(path + ".part", path)
    os.remove(tmp)
    return paths


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Every `tokenizer.*` key of the vocabulary file, with its type."""
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def matrix(rng, rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)


def norm_weight(rng, n: int) -> np.ndarray:
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """`data` (rows a multiple of 256 wide) as GGUF Q4_K blocks, one row of bytes per row.

    A block holds 256 values in 8 sub-blocks of 32: each value is `d * sc[j] * q - dmin * m[j]`
    with a 4-bit `q`, 6-bit sub-block scales `sc` and mins `m`, and f16 `d` and `dmin` for the
    block (144 bytes). Each sub-block spans its own range (its minimum, taken no higher than 0,
    to its maximum); llama.cpp's quantizer also searches for a better scale, which a test model
    does not need.
    """
    rows, cols = data.shape
    if cols % 256:
        raise ValueError(f"Q4_K rows are a multiple of 256 values wide, not {cols}")
    x = data.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(x.min(axis=2), 0.0)
    scale = (x.max(axis=2) - low) / 15.0
    mins = -low
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16)

    def steps(v: np.ndarray, unit: np.ndarray, top: int) -> np.ndarray:
        unit = unit.astype(np.float32)[:, None]
        safe = np.where(unit > 0, unit, 1.0)
        return np.where(unit > 0, np.rint(v / safe), 0).clip(0, top).astype(np.uint8)

    sc = steps(scale, d, 63)
    m = steps(mins, dmin, 63)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    safe = np.where(step > 0, step, 1.0)[..., None]
    q = np.where(step[..., None] > 0, np.rint((x + offset[..., None]) / safe), 0)
    q = q.clip(0, 15).astype(np.uint8)
    # Scales and mins of sub-blocks 0-3 in the low 6 bits of bytes 0-7; those of 4-7 split
    # into their low 4 bits (bytes 8-11) and their top 2 bits (the top of bytes 0-7).
    packed = np.empty((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    # 64 values to each 32 bytes: sub-block 2k in the low nibbles, 2k + 1 in the high ones.
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1
    )
    out = blocks.reshape(rows, cols // 256 * 144)
    # The layout, checked by the `gguf` package's Q4_K reader: it reads back the values meant,
    # and those are as close to the originals as 4 bits allow (about a tenth of their spread).
    back = quants.dequantize(out, Q.Q4_K).reshape(-1, 8, 32)
    if not np.allclose(back, step[..., None] * q - offset[..., None], rtol=1e-6, atol=1e-7):
        raise AssertionError("Q4_K blocks do not read back as written")
    if np.sqrt(np.mean((back - x) ** 2)) > 0.15 * np.sqrt(np.mean(x**2)):
        raise AssertionError("Q4_K blocks lose more than 4 bits should")
    return out


def add(writer: GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if qtype is None:
        writer.add_tensor(name, data)
    elif qtype == Q.Q4_K:
        writer.add_tensor(name, quantize_q4_k(data), raw_dtype=qtype)
    else:
        writer.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)


def write(name: str, spec: dict, vocab_path: str, out: str) -> None:
    reader = GGUFReader(vocab_path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
    arch, h, hd = spec["arch"], spec["hidden"], spec["head_dim"]
    heads, kv = spec["heads"], spec["kv_heads"]
    w = GGUFWriter(out, arch)
    # llama.cpp marks Phi-3's special tokens by the model's name.
    w.add_name("Phi3" if arch == "phi3" else name)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(h)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(spec["ffn"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec["rope_base"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if arch == "phi3":
        # LongRoPE (Phi-3.5 mini, Phi-3 128k): llama.cpp uses the short factors up to the
        # original context, and scales RoPE's cosines and sines by the attention factor.
        w.add_uint32("phi3.rope.scaling.original_context_length", CONTEXT)
        w.add_float32("phi3.rope.scaling.attn_factor", 1.19)
    copy_tokenizer(reader, w)
    if spec["vocab"] == "llama-bpe":
        w.add_chat_template(LLAMA3_TEMPLATE)

    # The embeddings' scale sets the logits' spread (tied) and the residual stream's size.
    add(w, "token_embd.weight", (rng.standard_normal((vocab, h)) * 0.3).astype(np.float32),
        spec["embd"])
    add(w, "output_norm.weight", norm_weight(rng, h), None)
    if not spec["tied"]:
        add(w, "output.weight", matrix(rng, vocab, h, 3.0), Q.Q8_0)
    if arch == "phi3":
        w.add_tensor("rope_factors_short.weight", np.geomspace(1.0, 3.0, hd // 2).astype(np.float32))
        w.add_tensor("rope_factors_long.weight", np.geomspace(1.0, 40.0, hd // 2).astype(np.float32))
    if spec.get("rope_freqs"):
        # Llama 3.1-style factors: high frequencies kept, low ones divided by up to 8.
        w.add_tensor("rope_freqs.weight", np.geomspace(1.0, 8.0, hd // 2).astype(np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(w, p + "attn_norm.weight", norm_weight(rng, h), None)
        q = matrix(rng, heads * hd, h, 1.5)
        k = matrix(rng, kv * hd, h, 1.5)
        v = matrix(rng, kv * hd, h)
        if spec.get("fused"):
            add(w, p + "attn_qkv.weight", np.concatenate([q, k, v]), spec["attn"])
        else:
            add(w, p + "attn_q.weight", q, spec["attn"])
            add(w, p + "attn_k.weight", k, spec["attn"])
            add(w, p + "attn_v.weight", v, spec["attn"])
        if spec.get("bias"):
            for t, n in (("q", heads), ("k", kv), ("v", kv)):
                add(w, p + f"attn_{t}.bias", (0.5 * rng.standard_normal(n * hd)).astype(np.float32),
                    None)
        if spec.get("qk_norm"):
            add(w, p + "attn_q_norm.weight", norm_weight(rng, hd), None)
            add(w, p + "attn_k_norm.weight", norm_weight(rng, hd), None)
        add(w, p + "attn_output.weight", matrix(rng, h, heads * hd), spec["attn"])
        add(w, p + "ffn_norm.weight", norm_weight(rng, h), None)
        gate = matrix(rng, spec["ffn"], h, 2.0)
        up = matrix(rng, spec["ffn"], h, 2.0)
        if spec.get("fused"):
            add(w, p + "ffn_up.weight", np.concatenate([gate, up]), spec["ffn_type"])
        else:
            add(w, p + "ffn_gate.weight", gate, spec["ffn_type"])
            add(w, p + "ffn_up.weight", up, spec["ffn_type"])
        add(w, p + "ffn_down.weight", matrix(rng, h, spec["ffn"]),
            spec.get("down_type", spec["ffn_type"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    vocabs = fetch_vocabs(os.path.join(out_dir, "vocab"))
    for name, spec in MODELS.items():
        path = os.path.join(out_dir, f"{name}.gguf")
        write(name, spec, vocabs[spec["vocab"]], path + ".part")
        os.replace(path + ".part", path)
        with open(path, "rb") as f:
            print(f"{path}: {hashlib.sha256(f.read()).hexdigest()}")


if __name__ == "__main__":
    main()
