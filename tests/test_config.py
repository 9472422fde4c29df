import re
from pathlib import Path

import pytest

from pipeline.chunks import discover_chunks, select_chunks
from pipeline.config import PILE_SET_NAMES, ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (ROOT / "config.ini").read_text()


def ini_with(tmp_path, *edits, text=DEFAULT) -> Path:
    """config.ini with `key = value` lines replaced ((key, value) pairs, value None removes the line)."""
    for key, value in edits:
        pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
        assert pattern.search(text), key
        text = pattern.sub("" if value is None else f"{key} = {value}", text, count=1)
    path = tmp_path / "config.ini"
    path.write_text(text)
    return path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    return str(e.value)


def test_shipped_configs_load():
    settings = load_settings(ROOT / "config.ini")
    assert settings.preprocessing.max_len_tokens == 512
    pile = load_settings(ROOT / "configs" / "pile-gpt2-small.ini")
    assert pile.preprocessing.pile_sets_to_use == (
        "FreeLaw", "HackerNews", "Books3", "OpenWebText2", "Gutenberg (PG-19)", "Pile-CC", "BookCorpus2",
        "Wikipedia (en)", "PubMed Abstracts")
    assert (pile.architecture.N, pile.architecture.d_model, pile.train.num_of_chunks_to_use) == (12, 768, 17)


def test_there_are_22_pile_subsets():
    assert len(PILE_SET_NAMES) == 22 == len(set(PILE_SET_NAMES))


def test_min_len_words_above_max_names_section_and_key(tmp_path):
    msg = error_of(ini_with(tmp_path, ("min_len_words", "300")))
    assert "[preprocessing] min_len_words: 300 is larger than max_len_words (256)" in msg


def test_a_non_number_names_the_key(tmp_path):
    msg = error_of(ini_with(tmp_path, ("max_len_tokens", "lots")))
    assert "[preprocessing] max_len_tokens: 'lots' is not a valid int" in msg


def test_unknown_subset_suggests_the_closest(tmp_path):
    msg = error_of(ini_with(tmp_path, ("pile_sets_to_use", "Github|Wikipedia")))
    assert "[preprocessing] pile_sets_to_use: 'Wikipedia' is not a Pile subset; did you mean 'Wikipedia (en)'?" in msg


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = ini_with(tmp_path, text=DEFAULT.replace("max_len_words = 256", "max_len_word = 256"))
    assert "[preprocessing] max_len_word: unknown key; did you mean 'max_len_words'?" in error_of(path)


def test_batch_budget_smaller_than_one_document(tmp_path):
    msg = error_of(ini_with(tmp_path, ("max_num_of_tokens_in_batch", "400")))
    assert "[preprocessing] max_num_of_tokens_in_batch: 400 cannot hold one document" in msg


def test_shard_budget_smaller_than_a_batch(tmp_path):
    msg = error_of(ini_with(tmp_path, ("tokens_per_shard", "1000")))
    assert "[preprocessing] tokens_per_shard: 1000 is smaller than one batch" in msg


def test_positions_shorter_than_the_longest_document(tmp_path):
    msg = error_of(ini_with(tmp_path, ("positional_encoding_max_pos", "512")))
    assert "[architecture] positional_encoding_max_pos: 512 is shorter than" in msg


def test_heads_must_tile_d_model(tmp_path):
    assert "[architecture] d_k:" in error_of(ini_with(tmp_path, ("d_k", "33")))


def test_missing_required_key(tmp_path):
    msg = error_of(ini_with(tmp_path, ("path_to_original_data", None)))
    assert "[preprocessing] path_to_original_data: missing" in msg


def test_keys_left_out_take_their_defaults(tmp_path):
    settings = load_settings(ini_with(tmp_path, ("tokens_per_shard", None), ("top_p", None)))
    assert settings.preprocessing.tokens_per_shard == 16_777_216 and settings.inference.top_p == 1.0


def test_val_chunk_must_exist(tmp_path):
    (tmp_path / "data").mkdir()
    for stem in ("00", "01"):
        (tmp_path / "data" / f"{stem}.jsonl").write_text("")
    ini = ini_with(tmp_path, ("path_to_original_data", tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"\[val\] data_from_what_chunk_to_use: 'val' is not a chunk"):
        select_chunks(load_settings(ini))


def test_too_few_train_chunks(tmp_path):
    (tmp_path / "data").mkdir()
    for stem in ("00", "val"):
        (tmp_path / "data" / f"{stem}.jsonl").write_text("")
    ini = ini_with(tmp_path, ("path_to_original_data", tmp_path / "data"), ("num_of_chunks_to_use", 2))
    with pytest.raises(ConfigError, match=r"\[train\] num_of_chunks_to_use: 2, but .* has only 1 chunks"):
        select_chunks(load_settings(ini))


def test_chunks_sorted_by_stem_and_only_the_used_ones(tmp_path):
    for name in ("10.jsonl", "02.jsonl.zst", "val.jsonl.zst", "01.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert list(discover_chunks(tmp_path)) == ["01", "02", "10", "val"]
    ini = ini_with(tmp_path, ("path_to_original_data", tmp_path), ("num_of_chunks_to_use", 2))
    train, val, paths = select_chunks(load_settings(ini))
    assert (train, val, sorted(paths)) == (["01", "02"], "val", ["01", "02", "val"])


def test_numbered_chunks_sort_by_number_as_the_original_named_them(tmp_path):
    for name in ("10.jsonl", "2.jsonl", "0.jsonl", "29.jsonl", "test.jsonl", "1.jsonl"):
        (tmp_path / name).write_text("")
    assert list(discover_chunks(tmp_path)) == ["0", "1", "2", "10", "29", "test"]


def test_same_chunk_twice_is_an_error(tmp_path):
    (tmp_path / "00.jsonl").write_text("")
    (tmp_path / "00.jsonl.zst").write_text("")
    with pytest.raises(ConfigError, match="chunk '00' is there twice"):
        discover_chunks(tmp_path)


def test_compile_is_auto_true_or_false(tmp_path):
    assert load_settings(ini_with(tmp_path, ("compile", "auto"))).train.compile == "auto"
    assert load_settings(ini_with(tmp_path, ("compile", "true"))).train.compile == "true"
    assert "[train] compile: 'sometimes' is not one of auto, true, false" in \
        error_of(ini_with(tmp_path, ("compile", "sometimes")))
