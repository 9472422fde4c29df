import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import filter
from pipeline.io import InputError, iter_lines, read_json
from tests.corpus import doc_line, sample_lines, write_chunk

SETTINGS = dict(pile_sets_to_use=["Wikipedia (en)", "Github"], min_len_words=3, max_len_words=5)


def run_filter(tmp_path, src, **settings):
    out, manifest = tmp_path / "out.parquet", tmp_path / "out.json"
    result = filter.run(src, out, manifest, **{**SETTINGS, **settings})
    assert read_json(manifest) == result
    return pq.read_table(out).to_pylist(), result


def test_cut_words_keeps_the_seeds_semantics():
    assert filter.cut_words("a  b\n\tc", 3, 5) == ("a b c", 3)          # re-joined with single spaces
    assert filter.cut_words("a b", 3, 5) is None                          # under min_len_words
    assert filter.cut_words(" a b c d e f g ", 3, 5) == ("a b c d e", 5)  # first max_len_words words
    assert filter.cut_words("a b c d e", 3, 5) == ("a b c d e", 5)


def test_keeps_chosen_subsets_and_counts_what_it_drops(tmp_path):
    src = write_chunk(tmp_path / "00.jsonl", [
        doc_line("one two three four five six seven", "Wikipedia (en)"),
        doc_line("def f(x):\n    return x", "Github"),
        doc_line("too short", "Github"),
        doc_line("a b c d", "Pile-CC"),
    ])
    rows, result = run_filter(tmp_path, src)
    assert rows == [{"text": "one two three four five", "pile_set_name": "Wikipedia (en)"},
                    {"text": "def f(x): return x", "pile_set_name": "Github"}]
    assert result["docs_in"] == 4 and result["docs_kept"] == 2
    assert result["dropped"] == {"other_subset": 1, "under_min_len_words": 1, "malformed": 0}
    assert result["per_subset"] == {"Wikipedia (en)": {"docs": 1, "words": 5, "bytes": 23},
                                    "Github": {"docs": 1, "words": 4, "bytes": 18}}
    assert result["words_kept"] == 9 and result["bytes_kept"] == 41


def test_malformed_lines_are_skipped_and_reported_with_line_numbers(tmp_path):
    good = doc_line("one two three", "Github")
    src = write_chunk(tmp_path / "00.jsonl", [
        good,
        b'{"text": "unterminated',
        b'{"meta": {"pile_set_name": "Github"}}',
        b'{"text": "a b c", "meta": {}}',
        b'{"text": "a b c \xff\xfe", "meta": {"pile_set_name": "Github"}}',
        b'[1, 2]',
        good,
    ])
    rows, result = run_filter(tmp_path, src)
    assert len(rows) == 2 and result["dropped"]["malformed"] == 5
    examples = result["malformed_examples"]
    assert [e.split(": ")[0] for e in examples] == [f"{src}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "not valid JSON" in examples[0] and "no string 'text'" in examples[1]
    assert "meta.pile_set_name" in examples[2] and "UTF-8" in examples[3]


def test_zst_and_plain_jsonl_give_the_same_output(tmp_path):
    lines = sample_lines("00", 200)
    plain, zst = write_chunk(tmp_path / "a.jsonl", lines), write_chunk(tmp_path / "b.jsonl.zst", lines)
    settings = dict(pile_sets_to_use=["Gutenberg (PG-19)", "Github"], min_len_words=16, max_len_words=256)
    rows_a, result_a = run_filter(tmp_path, plain, **settings)
    rows_b, result_b = run_filter(tmp_path, zst, **settings)
    assert rows_a == rows_b and len(rows_a) > 50
    assert result_a["sha256"] == result_b["sha256"]


def test_several_zst_frames_are_read_across(tmp_path):
    lines = sample_lines("val", 40)
    cctx = zstandard.ZstdCompressor()
    src = tmp_path / "x.jsonl.zst"
    src.write_bytes(b"".join(cctx.compress(b"".join(line + b"\n" for line in part)) for part in (lines[:15], lines[15:])))
    assert [line for _, line in iter_lines(src)] == lines


def test_truncated_zst_is_an_error_naming_the_file(tmp_path):
    good = write_chunk(tmp_path / "00.jsonl.zst", sample_lines("00", 300))
    bad = tmp_path / "03.jsonl.zst"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out.parquet"
    with pytest.raises(InputError, match=r"03.jsonl.zst: the zstd stream ends early \(truncated download\?\)"):
        filter.run(bad, out, tmp_path / "out.json", **SETTINGS)
    assert sorted(tmp_path.iterdir()) == [good, bad]  # no output, no temporary file left


def test_corrupt_zst_is_an_error_naming_the_file(tmp_path):
    data = bytearray(write_chunk(tmp_path / "00.jsonl.zst", sample_lines("00", 300)).read_bytes())
    data[4:40] = b"\x00" * 36  # the frame header and first block
    bad = tmp_path / "04.jsonl.zst"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="04.jsonl.zst: the zstd stream is corrupt"):
        filter.run(bad, tmp_path / "out.parquet", tmp_path / "out.json", **SETTINGS)
    assert not (tmp_path / "out.parquet").exists()


def test_same_input_gives_byte_identical_output(tmp_path):
    src = write_chunk(tmp_path / "00.jsonl.zst", sample_lines("00", 300))
    a = filter.run(src, tmp_path / "a.parquet", tmp_path / "a.json", **SETTINGS)
    b = filter.run(src, tmp_path / "b.parquet", tmp_path / "b.json", **SETTINGS)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert a["sha256"] == b["sha256"]
