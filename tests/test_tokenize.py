import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import tokenize
from pipeline.filter import SCHEMA as FILTERED
from pipeline.io import read_json
from pipeline.tokenizer import gpt2_encoding


def filtered_file(path, docs):
    pq.write_table(pa.table({"text": [t for t, _ in docs], "pile_set_name": [n for _, n in docs]}, schema=FILTERED),
                   path)
    return path


def test_documents_start_with_endoftext_and_are_cut_to_max_len_tokens(tmp_path):
    enc = gpt2_encoding()
    long_text = " ".join(f"word{i}" for i in range(100))
    src = filtered_file(tmp_path / "f.parquet", [("Hello world", "Github"), (long_text, "Wikipedia (en)")])
    result = tokenize.run(src, tmp_path / "t.parquet", tmp_path / "t.json", max_len_tokens=10, threads=2)
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert rows[0] == {"tokens": [50256, 15496, 995], "pile_set_name": "Github", "n_bytes": 11}
    assert rows[1]["tokens"] == [50256] + enc.encode_ordinary(long_text)[:10]
    # bytes covered by the kept tokens only
    assert rows[1]["n_bytes"] == len(enc.decode_bytes(rows[1]["tokens"][1:]))
    assert result["docs"] == 2 and result["tokens"] == 3 + 11 and result["docs_cut_to_max_len_tokens"] == 1
    assert result["per_subset"]["Github"] == {"docs": 1, "tokens": 3, "bytes": 11}
    assert read_json(tmp_path / "t.json") == result


def test_uncut_documents_cover_all_their_utf8_bytes(tmp_path):
    docs = [("naïve café — 日本語 🎉", "Wikipedia (en)"), ("x = {'a': 1}\nprint(x)", "Github")] * 3000
    src = filtered_file(tmp_path / "f.parquet", docs)
    tokenize.run(src, tmp_path / "t.parquet", tmp_path / "t.json", max_len_tokens=512, threads=2)
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("n_bytes").to_pylist() == [len(t.encode()) for t, _ in docs]
    enc = gpt2_encoding()
    assert [enc.decode(t[1:]) for t in table.column("tokens").to_pylist()[:4]] == [t for t, _ in docs[:4]]


def test_special_token_text_inside_a_document_is_ordinary_text(tmp_path):
    # A document may quote "<|endoftext|>" (code, papers about GPT-2): it is 7 ordinary tokens, not a boundary.
    text = "a <|endoftext|> b"
    src = filtered_file(tmp_path / "f.parquet", [(text, "Github"), ("", "Github")])
    tokenize.run(src, tmp_path / "t.parquet", tmp_path / "t.json", max_len_tokens=64)
    tokens = pq.read_table(tmp_path / "t.parquet").column("tokens").to_pylist()
    assert tokens == [[50256] + gpt2_encoding().encode_ordinary(text), [50256]]
    assert tokens[0].count(50256) == 1


def test_a_10_mb_word_is_cut_before_encoding_and_keeps_max_len_tokens(tmp_path):
    # A DNA or base64 blob: one regex piece of 10 MB. Encoding all of it would take tiktoken many seconds;
    # the text is cut to text_bound characters first, so this document costs what a 64 KB one does.
    blob = "ACGT" * 2_500_000
    src = filtered_file(tmp_path / "f.parquet", [("sequence: " + blob, "Github"), ("after it", "Github")])
    result = tokenize.run(src, tmp_path / "t.parquet", tmp_path / "t.json", max_len_tokens=512, threads=2)
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert len(rows[0]["tokens"]) == 513 and rows[0]["tokens"][0] == 50256
    enc = gpt2_encoding()
    assert enc.decode(rows[0]["tokens"][1:]).startswith("sequence: ACGTACGT")
    assert rows[0]["n_bytes"] == len(enc.decode_bytes(rows[0]["tokens"][1:]))
    assert rows[1]["tokens"] == [50256] + enc.encode_ordinary("after it")
    assert result["docs_cut_to_max_len_tokens"] == 1


def test_the_cut_before_encoding_never_changes_the_tokens_of_normal_text():
    # Texts far longer than the bound, of words up to 250 characters (the proof in text_bound covers pieces under
    # 252 bytes), unicode, digits, punctuation runs and whitespace runs; small max_len_tokens, so the bound
    # (max_len_tokens + 1) x 128 is tight: the kept tokens must be those of the whole text.
    enc = gpt2_encoding()
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij") + ["é", "日", "🎉", "7", "-", "=", "'s", "\n", "  ", "\t"]
    for max_len_tokens in (1, 3, 8, 40):
        bound = tokenize.text_bound(max_len_tokens)
        assert bound == (max_len_tokens + 1) * 128
        for _ in range(30):
            words = []
            while sum(map(len, words)) < 3 * bound:
                longest = 250 if rng.random() < 0.2 else 12
                words.append("".join(rng.choice(alphabet, size=int(rng.integers(1, longest)))))
            text = " ".join(words)
            assert len(text) > bound
            lengths, tokens, cut = tokenize.encode_slice([text], max_len_tokens)
            assert tokens[1:].tolist() == enc.encode_ordinary(text)[:max_len_tokens], (max_len_tokens, text[:200])
            assert cut == 1 and lengths.tolist() == [max_len_tokens + 1]
