"""GPT-2's byte-level BPE through tiktoken, built offline from the ranks shipped beside this file.

tiktoken's own "gpt2" encoding would download its ranks at run time; this builds the same encoder from
`gpt2.tiktoken` (byte-identical to OpenAI's r50k_base.tiktoken) after checking its sha256.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import numpy as np
import tiktoken

from pipeline.config import EOT

RANKS_FILE = Path(__file__).with_name("gpt2.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer, as tiktoken writes it (equivalent to the original release's regex, faster).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def load_ranks(path: Path = RANKS_FILE, expected_sha256: str = RANKS_SHA256) -> dict[bytes, int]:
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} is not GPT-2's ranks ({expected_sha256}); the file is damaged")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoder: 50,256 BPE tokens plus <|endoftext|> = 50256."""
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=50257)


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for <|endoftext|>): bytes covered = lengths[tokens].sum()."""
    enc = gpt2_encoding()  # built once per process; reading the ranks again would double the start-up
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    lengths[:EOT] = [len(enc.decode_single_token_bytes(token)) for token in range(EOT)]
    return lengths
