#!/usr/bin/env python3
"""Writes the seed files of fuzz/corpus/safetensors/: small valid safetensors files covering
every dtype family, metadata, scalars and zero-size tensors. Built with the standard library
only (struct + json), independently of relora's writer, so the seeds also cross-check it.

    python3 fuzz/make_seed_corpus.py        # rewrites the seeds in place
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "safetensors")


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in the order given."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)  # the reference pads to a multiple of 8
    return struct.pack("<Q", len(text)) + text + b"".join(raw for _, _, _, raw in tensors)


SEEDS = {
    "empty.safetensors": safetensors([]),
    "peft_adapter.safetensors": safetensors(
        [
            ("base_model.model.fc1.lora_A.weight", "F32", [2, 3], struct.pack("<6f", 1, -2, 0.5, 0, -0.0, 3)),
            ("base_model.model.fc1.lora_B.weight", "F32", [4, 2], struct.pack("<8f", *([0.0] * 8))),
        ],
        {"format": "pt"},
    ),
    "half_types.safetensors": safetensors(
        [
            ("h", "F16", [4], struct.pack("<4H", 0x3C00, 0x0001, 0x7C00, 0x7E00)),
            ("g", "BF16", [2, 1], struct.pack("<2H", 0x3F80, 0xFF80)),
            ("d", "F64", [], struct.pack("<d", 0.1)),
        ]
    ),
    "checkpoint_like.safetensors": safetensors(
        [
            ("step", "I64", [1], struct.pack("<q", 150)),
            ("rng", "U64", [2], struct.pack("<2Q", 0xFEDCBA9876543210, 1)),
            ("mask", "BOOL", [3], bytes([0, 1, 1])),
            ("bytes", "U8", [2], bytes([7, 255])),
            ("none", "F32", [0, 5], b""),
            ("i", "I32", [1], struct.pack("<i", -5)),
        ],
        {"relora_format_version": "1", "checksum": "0123456789abcdef"},
    ),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
