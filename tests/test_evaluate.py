"""Evaluation: the figures of perplexity.json against a plain loop over documents; subsets add up; errors."""

import math

import numpy as np
import orjson
import pytest
import torch

from model import evaluate
from model.checkpoint import save_model
from model.gpt import GPT
from pipeline.config import EOT, PILE_SET_NAMES, Architecture
from pipeline.shards import Batch, ShardReader, ShardWriter
from pipeline.tokenizer import gpt2_encoding, token_byte_lengths
from tests.synthetic import make_split, write_tiny_ini

ARCH = Architecture(N=2, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
START = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model (weights large enough that documents differ in loss), a synthetic val split, and the
    evaluate stage's outputs for them."""
    folder = tmp_path_factory.mktemp("eval")
    _, val = make_split(folder, n_chunks=1, shards_per_chunk=1, batches_per_shard=1, val_batches=6, max_len=40)
    torch.manual_seed(0)
    model = GPT(ARCH, init_std=0.2).eval()
    save_model(folder / "final.pt", model, ARCH, run_dir="run-test", step=7, tokens=1234)
    doc = evaluate.run(folder / "final.pt", val, folder / "results" / "perplexity.json",
                       folder / "results" / "perplexity.md", START, "cpu", "float32", threads=1,
                       log=folder / "evaluate.log")
    return folder, model, val, doc


def plain_loop(model, val, start):
    """The figures by hand: one document at a time, one position at a time."""
    lengths = token_byte_lengths()
    per_doc = []  # (subset, predicted tokens, nll nats, bytes, nll nats at the original's positions)
    for batch in ShardReader(val):
        for j in range(batch.n_docs):
            doc = torch.from_numpy(batch.tokens[j].astype(np.int64))
            with torch.no_grad():
                logp = torch.log_softmax(model(doc[None])[0].double(), dim=-1)
            nll, n_bytes, n = 0.0, 0, 0
            for i in range(start, len(doc)):
                target = int(doc[i + 1]) if i + 1 < len(doc) else EOT
                nll -= logp[i, target].item()
                n_bytes += int(lengths[target])
                n += 1
            # the original ppl.py: positions start ... L-2, never the last one (whose target is <|endoftext|>)
            original = -sum(logp[i, int(doc[i + 1])].item() for i in range(start, len(doc) - 1))
            per_doc.append((PILE_SET_NAMES[batch.pile_set[j]], n, nll, n_bytes, original))
    return per_doc


def figures(docs):
    tokens = sum(d[1] for d in docs)
    nll = sum(d[2] for d in docs)
    return {"documents": len(docs), "tokens": tokens, "bytes": sum(d[3] for d in docs),
            "mean_loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / sum(d[3] for d in docs),
            "document_averaged_perplexity": 2 ** np.mean([d[4] / (d[1] - 1) / math.log(2) for d in docs])}


def assert_figures_equal(got, want):
    for key, value in want.items():
        if isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5), key


def test_figures_equal_a_plain_loop_over_documents(setup):
    folder, model, val, doc = setup
    per_doc = plain_loop(model, val, START)
    assert_figures_equal(doc["overall"], figures(per_doc))
    for name, got in doc["per_subset"].items():
        assert_figures_equal(got, figures([d for d in per_doc if d[0] == name]))
    assert set(doc["per_subset"]) == {d[0] for d in per_doc}
    assert doc["overall"]["documents"] == sum(ShardReader(val).n_docs())
    assert json_on_disk(folder) == doc


def test_document_average_scores_the_original_positions_by_hand():
    """Two documents of L = 6 with start = 2, their -log2 p per position written out: the original's positions
    2 ... 4 give means 2 and 4 bits, so 2 ** 3 = 8; position 5 (the final <|endoftext|> target, 100 bits
    here) counts in the token-weighted figures only."""
    bits = np.array([[9, 9, 1, 2, 3, 100],
                     [9, 9, 4, 4, 4, 100]], dtype=np.float64)
    tokens = np.full((2, 6), 11, dtype=np.uint16)
    tokens[:, 0] = EOT
    sums = evaluate.document_sums(bits * math.log(2), tokens, start=2)
    tally = evaluate.Tally()
    for j in range(2):
        tally.add(sums["tokens"][j], sums["nll"][j], sums["bytes"][j], 0, sums["averaged_tokens"][j],
                  sums["averaged_nll"][j])
    f = tally.figures()
    assert list(sums["averaged_tokens"]) == [3, 3] and list(sums["tokens"]) == [4, 4]
    assert f["document_averaged_perplexity"] == pytest.approx(8.0, rel=1e-12)
    assert f["mean_loss"] == pytest.approx((6 + 100 + 12 + 100) / 8 * math.log(2), rel=1e-12)
    assert f["documents"] == f["documents_averaged"] == 2


def test_a_document_with_only_the_final_target_after_start_is_left_out_of_the_document_average():
    tokens = np.array([[EOT, 11, 12]], dtype=np.uint16)  # L = 3, start = 2: only position 2, the final target
    sums = evaluate.document_sums(np.array([[5.0, 5.0, 7.0]]), tokens, start=2)
    tally = evaluate.Tally()
    tally.add(sums["tokens"][0], sums["nll"][0], sums["bytes"][0], 0, sums["averaged_tokens"][0],
              sums["averaged_nll"][0])
    f = tally.figures()
    assert f["documents"] == 1 and f["tokens"] == 1 and f["mean_loss"] == 7.0
    assert f["documents_averaged"] == 0 and math.isnan(f["document_averaged_perplexity"])


def json_on_disk(folder):
    return orjson.loads((folder / "results" / "perplexity.json").read_bytes())


def test_per_subset_figures_combine_to_the_overall_ones(setup):
    _, _, _, doc = setup
    subsets, total = doc["per_subset"].values(), doc["overall"]
    assert len(subsets) == 3
    for key in ("documents", "tokens", "bytes", "documents_bytes"):
        assert sum(s[key] for s in subsets) == total[key]
    nll = sum(s["mean_loss"] * s["tokens"] for s in subsets)
    assert math.exp(nll / total["tokens"]) == pytest.approx(total["perplexity"], rel=1e-9)
    assert nll / math.log(2) / total["bytes"] == pytest.approx(total["bits_per_byte"], rel=1e-9)
    log2_means = sum(math.log2(s["document_averaged_perplexity"]) * s["documents"] for s in subsets)
    assert 2 ** (log2_means / total["documents"]) == pytest.approx(total["document_averaged_perplexity"], rel=1e-9)
    # documents differ, so the document average is not the token-weighted figure
    assert total["document_averaged_perplexity"] != pytest.approx(total["perplexity"], rel=1e-3)


def test_untrained_baseline_is_about_the_vocabulary_size(setup):
    _, _, _, doc = setup
    untrained = doc["untrained"]["overall"]
    assert 0.9 * 50257 < untrained["perplexity"] < 1.2 * 50257
    assert 0 < untrained["tokens"] <= doc["overall"]["tokens"]
    assert doc["overall"]["perplexity"] != pytest.approx(untrained["perplexity"], rel=1e-3)  # another model


def test_table_is_written_and_printed(setup, capsys):
    folder, _, _, doc = setup
    table = (folder / "results" / "perplexity.md").read_text()
    assert "| **overall** |" in table and "untrained model" in table
    for name in doc["per_subset"]:
        assert f"| {name} |" in table
    assert f"{doc['overall']['perplexity']:,.2f}" in table
    assert "bits_per_byte" in doc["definitions"] and "bytes" in doc["definitions"]
    assert "start ... L-2" in doc["definitions"]["document_averaged_perplexity"]
    assert f"positions {START} ... L-1" in table and f"positions {START} ... L-2" in table
    assert doc["start_predicting_from_what_token"] == START and doc["model_step"] == 7


def test_with_nothing_skipped_the_bytes_are_the_documents_text(tmp_path):
    """Real text: from position 0 on, the predicted tokens cover exactly the document's UTF-8 bytes."""
    enc = gpt2_encoding()
    texts = ["Zürich is 408 m above sea level — naïve café.", "Ein Beispiel: 東京 and ünïcödé ✓ end"]
    ids = [[EOT] + enc.encode(t) for t in texts]
    shard = ShardWriter(tmp_path / "val.arrow")
    for t, i in zip(texts, ids):
        shard.add(Batch(tokens=np.array([i], np.uint16), pile_set=np.array([12], np.int8),
                        n_bytes=np.array([len(t.encode())], np.int32)))
    shard.close()
    model = GPT(ARCH).eval()
    tallies = evaluate.evaluate_model(model, tmp_path / "val.arrow", 0, torch.device("cpu"))
    f = tallies["Wikipedia (en)"].figures()
    assert f["bytes"] == f["documents_bytes"] == sum(len(t.encode()) for t in texts)
    assert f["tokens"] == sum(len(i) for i in ids)  # every position, the final <|endoftext|> target included
    skipped = evaluate.evaluate_model(model, tmp_path / "val.arrow", 4, torch.device("cpu"))["Wikipedia (en)"]
    lengths = token_byte_lengths()
    assert skipped.bytes == f["bytes"] - sum(int(lengths[i[1:5]].sum()) for i in ids)


def test_bfloat16_autocast_gives_nearly_the_float32_figures(setup):
    folder, model, val, doc = setup
    tallies = evaluate.evaluate_model(model, val, START, torch.device("cpu"), "bfloat16")
    assert evaluate.overall(tallies).figures()["mean_loss"] == pytest.approx(doc["overall"]["mean_loss"], rel=0.005)


def test_every_kth_batch_evaluates_just_those_batches(setup):
    _, model, val, _ = setup
    reader = ShardReader(val)
    tallies = evaluate.evaluate_model(model, val, START, torch.device("cpu"), every=4)
    assert evaluate.overall(tallies).documents == reader.n_docs()[::4].sum()
    assert evaluate.overall(tallies).tokens == sum((L - START) * n for L, n in zip(reader.seq_lens()[::4],
                                                                                     reader.n_docs()[::4]))


def test_documents_longer_than_the_context_are_an_error(setup):
    folder, _, val, _ = setup
    small = Architecture(N=1, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=12)
    with pytest.raises(ValueError, match="do not fit the model's context of 12"):
        evaluate.evaluate_model(GPT(small), val, START, torch.device("cpu"), context=12)


@pytest.fixture
def ini(tmp_path):
    return write_tiny_ini(tmp_path / "config.ini", tmp_path,
                          preprocessing={"max_len_tokens": 41}, val={"results_dir": "{folder}/results"},
                          train={"start_predicting_from_what_token": START})


def test_cli_evaluates_a_named_model_file(setup, ini, tmp_path, capsys):
    folder, _, val, doc = setup
    out = tmp_path / "step7"
    assert evaluate.main(["--ini", str(ini), "--model", str(folder / "final.pt"), "--val", str(val),
                          "--out", str(out), "--no-untrained"]) == 0
    assert "| **overall** |" in capsys.readouterr().out
    again = orjson.loads((out / "perplexity.json").read_bytes())
    assert again["overall"] == doc["overall"] and "untrained" not in again


def test_cli_errors_speak_to_the_user(setup, ini, tmp_path, capsys):
    folder, _, val, _ = setup
    missing = tmp_path / "checkpoints" / "final.pt"  # the ini's default model, never written
    assert evaluate.main(["--ini", str(ini), "--val", str(val)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err

    other = Architecture(N=3, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
    save_model(tmp_path / "other.pt", GPT(other), other)
    assert evaluate.main(["--ini", str(ini), "--model", str(tmp_path / "other.pt"), "--val", str(val)]) == 2
    assert "N = 3 in the file but 2 in [architecture]" in capsys.readouterr().err

    assert evaluate.main(["--ini", str(ini), "--model", str(folder / "final.pt")]) == 2
    assert "split/val.arrow: no such validation split" in capsys.readouterr().err
