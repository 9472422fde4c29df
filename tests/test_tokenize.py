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
