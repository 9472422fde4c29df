import hashlib

import socket

import pytest

from pipeline.tokenizer import RANKS_FILE, gpt2_encoding, load_ranks, token_byte_lengths

# Token ids of GPT-2's encoder, derived once from OpenAI's r50k_base ranks and pinned here.
PINNED = {
    "Hello world": [15496, 995],
    "It's 2026: naïve café — 日本語 🎉":
        [1026, 338, 1160, 2075, 25, 41492, 40304, 851, 10545, 245, 98, 17312, 105, 45739, 252, 12520, 236, 231],
    "    def f(x):\n        return x**2  # sq":
        [220, 220, 220, 825, 277, 7, 87, 2599, 198, 220, 220, 220, 220, 220, 220, 220, 1441, 2124, 1174, 17, 220,
         1303, 19862],
    "he's they'll I'VE 12345 1,000,000.50": [258, 338, 484, 1183, 314, 6, 6089, 17031, 2231, 352, 11, 830, 11, 830,
                                             13, 1120],
    "\t\n\n  trailing   ": [197, 628, 220, 25462, 220, 220, 220],
}


@pytest.mark.parametrize("text", PINNED)
def test_encoder_equals_gpt2_on_tricky_text(text):
    enc = gpt2_encoding()
    assert enc.encode_ordinary(text) == PINNED[text]
    assert enc.decode(PINNED[text]) == text


def test_vocabulary_is_gpt2s():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_ranks_file_is_openais_r50k_base():
    assert hashlib.sha256(RANKS_FILE.read_bytes()).hexdigest() == \
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_a_damaged_ranks_file_is_refused(tmp_path):
    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes(RANKS_FILE.read_bytes()[:-10])
    with pytest.raises(ValueError, match="gpt2.tiktoken: sha256 .* damaged"):
        load_ranks(damaged)


def test_token_byte_lengths_sum_to_the_utf8_size():
    text = "naïve café — 日本語 🎉 x**2"
    assert token_byte_lengths()[gpt2_encoding().encode_ordinary(text)].sum() == len(text.encode())


def test_nothing_is_downloaded(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to connect")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: a download would be needed
    gpt2_encoding.cache_clear()
    assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
