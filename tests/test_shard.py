import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shard
from pipeline.config import PILE_SET_ID
from pipeline.io import read_json
from pipeline.shards import ShardReader
from pipeline.tokenize import SCHEMA as TOKENIZED

NAMES = ["Github", "FreeLaw", "Wikipedia (en)"]


def tokenized_file(path, n_docs=3000, seed=0, max_len=60):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(1, max_len + 1))
        docs.append([50256] + rng.integers(0, 50256, n).tolist())
    names = [NAMES[i % 3] for i in range(n_docs)]
    n_bytes = [len(d) * 3 for d in docs]
    pq.write_table(pa.table({"tokens": docs, "pile_set_name": names, "n_bytes": n_bytes}, schema=TOKENIZED), path,
                   row_group_size=700)
    return docs, names, n_bytes


def read_all(folder):
    manifest = read_json(folder / "manifest.json")
    batches = [b for s in manifest["shards"] for b in ShardReader(folder / s["file"])]
    return manifest, batches


def seed_batches(docs, budget):
    """The seed's algorithm: stable sort by length, cut each run of one length into full batches."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    batches, i = [], 0
    while i < len(order):
        length = len(docs[order[i]])
        run = [j for j in order[i:] if len(docs[j]) == length]
        cap = budget // length
        batches += [tuple(run[k:k + cap]) for k in range(0, len(run), cap)]
        i += len(run)
    return batches


def test_batches_are_the_seeds_without_padding_and_shards_keep_their_budget(tmp_path):
    docs, names, n_bytes = tokenized_file(tmp_path / "t.parquet")
    result = shard.run(tmp_path / "t.parquet", tmp_path / "sharded", max_num_of_tokens_in_batch=130,
                       tokens_per_shard=5000)
    manifest, batches = read_all(tmp_path / "sharded")
    assert manifest == result and len(manifest["shards"]) > 5
    for info in manifest["shards"]:
        assert info["tokens"] <= 5000
    index = {tuple(d): i for i, d in enumerate(docs)}  # random docs: all distinct
    assert len(index) == len(docs)
    got = []
    for b in batches:
        n, seq_len = b.tokens.shape
        assert n * seq_len <= 130 and (b.tokens[:, 0] == 50256).all()
        ids = tuple(index[tuple(row.tolist())] for row in b.tokens)
        assert [PILE_SET_ID[names[i]] for i in ids] == b.pile_set.tolist()
        assert [n_bytes[i] for i in ids] == b.n_bytes.tolist()
        got.append(ids)
    assert sorted(got) == sorted(seed_batches(docs, 130))
    assert manifest["docs"] == len(docs) and manifest["tokens"] == sum(map(len, docs))


def test_sharding_is_deterministic(tmp_path):
    tokenized_file(tmp_path / "t.parquet")
    for name in ("a", "b"):
        shard.run(tmp_path / "t.parquet", tmp_path / name, max_num_of_tokens_in_batch=130, tokens_per_shard=5000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:  # the manifests differ only in the output path they name
        if f != "manifest.json":
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert read_json(tmp_path / "a" / "manifest.json")["shards"] == read_json(tmp_path / "b" / "manifest.json")["shards"]


def test_reader_gives_zero_copy_views_of_the_memory_map(tmp_path):
    tokenized_file(tmp_path / "t.parquet", n_docs=500)
    shard.run(tmp_path / "t.parquet", tmp_path / "s", max_num_of_tokens_in_batch=130, tokens_per_shard=10**6)
    reader = ShardReader(tmp_path / "s" / "shard_00000.arrow")
    batch = reader[len(reader) - 1]
    assert not batch.tokens.flags.owndata and not batch.tokens.flags.writeable
    assert reader.n_docs().sum() == 500 == sum(b.n_docs for b in reader)
