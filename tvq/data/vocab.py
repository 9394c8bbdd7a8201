"""Token ids shared by every dataset, and the byte vocabulary.

Ids 0, 1 and 2 are pad, end-of-sequence and unknown in every vocabulary, byte-level or
SentencePiece, so that padding and masking work the same way everywhere.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Byte b is token b + BYTE_OFFSET.
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


def byte_vocab_manifest() -> dict:
    """Describe the byte vocabulary for a dataset's manifest.json."""
    return {
        "type": "bytes",
        "size": BYTE_VOCAB_SIZE,
        "pad_id": PAD_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
        "byte_offset": BYTE_OFFSET,
    }


def smallest_uint_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned integer dtype for ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary size {vocab_size} does not fit in 32 bits")


def encode_bytes(data: bytes | np.ndarray) -> np.ndarray:
    """Map raw bytes to byte-vocabulary token ids (uint16, since 259 ids exceed uint8)."""
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    return raw.astype(smallest_uint_dtype(BYTE_VOCAB_SIZE)) + BYTE_OFFSET


def decode_bytes(tokens: np.ndarray) -> bytes:
    """Map byte-vocabulary ids back to bytes, dropping the special ids."""
    tokens = np.asarray(tokens)
    return (tokens[tokens >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()
