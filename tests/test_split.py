import numpy as np

from pipeline import split
from pipeline.io import read_json
from pipeline.shards import Batch, ShardReader, ShardWriter, read_train_manifest


def sharded_dir(folder, batches):
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / "shard_00000.arrow")
    for b in batches:
        writer.add(b)
    info = writer.close()
    (folder / "manifest.json").write_bytes(
        b'{"shards": [{"file": "%s", "batches": %d, "docs": %d, "tokens": %d, "sha256": "%s"}], '
        b'"batches": %d, "docs": %d, "tokens": %d, "per_subset": {"Github": {"docs": %d, "tokens": %d}}}' % (
            info["file"].encode(), info["batches"], info["docs"], info["tokens"], info["sha256"].encode(),
            info["batches"], info["docs"], info["tokens"], info["docs"], info["tokens"]))
    return folder


def batches(rng, n, seq_len=8, docs=4):
    out = []
    for _ in range(n):
        t = rng.integers(0, 50000, size=(docs, seq_len)).astype(np.uint16)
        t[:, 0] = 50256
        out.append(Batch(t, np.full(docs, 5, np.int8), np.full(docs, 30, np.int32)))
    return out


def run_split(tmp_path, train_batches, val_batches, num_of_docs=20, seed=1):
    train_dirs = [sharded_dir(tmp_path / "sharded" / f"{i:02d}", b) for i, b in enumerate(train_batches)]
    val_dir = sharded_dir(tmp_path / "sharded" / "val", val_batches)
    out = tmp_path / "split"
    result = split.run(train_dirs, val_dir, out / "train.json", out / "val.arrow", out / "manifest.json",
                       num_of_docs=num_of_docs, seed=seed)
    return result, list(ShardReader(out / "val.arrow"))


def test_val_is_about_num_of_docs_in_whole_random_batches(tmp_path):
    rng = np.random.default_rng(0)
    val = batches(rng, 30)
    result, got = run_split(tmp_path, [batches(rng, 5), batches(rng, 5)], val, num_of_docs=21)
    assert len(got) == 6 and sum(b.n_docs for b in got) == 24  # 4 docs a batch: whole batches to >= 21
    chosen = {b.tokens.tobytes() for b in got}
    assert chosen <= {b.tokens.tobytes() for b in val}
    assert result["val"]["docs"] == 24 and result["val"]["dropped_in_training_too"]["docs"] == 0


def test_the_choice_is_seeded(tmp_path):
    rng = np.random.default_rng(0)
    train, val = [batches(rng, 3)], batches(rng, 30)
    a = run_split(tmp_path / "a", train, val, seed=7)[1]
    b = run_split(tmp_path / "b", train, val, seed=7)[1]
    c = run_split(tmp_path / "c", train, val, seed=8)[1]
    assert [x.tokens.tobytes() for x in a] == [x.tokens.tobytes() for x in b]
    assert [x.tokens.tobytes() for x in a] != [x.tokens.tobytes() for x in c]
    assert (tmp_path / "a" / "split" / "val.arrow").read_bytes() == (tmp_path / "b" / "split" / "val.arrow").read_bytes()


def test_a_val_document_also_in_training_is_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    val = batches(rng, 3)
    leaked_row = val[1].tokens[2].copy()
    train = batches(rng, 4)
    train[3].tokens[0] = leaked_row  # the same token sequence, in another batch of a train chunk
    result, got = run_split(tmp_path, [batches(rng, 2), train], val, num_of_docs=100)
    rows = [row.tobytes() for b in got for row in b.tokens]
    assert leaked_row.tobytes() not in rows and len(rows) == 11
    assert result["val"]["dropped_in_training_too"] == {"docs": 1, "per_subset": {"Github": {"docs": 1}}}
    assert [b.n_docs for b in got] == [4, 3, 4]  # the batch shrank; still no padding


def test_train_split_lists_the_train_shards(tmp_path):
    rng = np.random.default_rng(0)
    result, _ = run_split(tmp_path, [batches(rng, 2), batches(rng, 3)], batches(rng, 2))
    chunks = read_train_manifest(tmp_path / "split" / "train.json")
    assert [c["chunk"] for c in chunks] == ["00", "01"]
    assert chunks[1]["shards"] == [str(tmp_path / "sharded" / "01" / "shard_00000.arrow")]
    assert result["train"]["docs"] == 20 == read_json(tmp_path / "split" / "train.json")["docs"]
