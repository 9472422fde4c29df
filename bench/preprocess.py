"""Preprocessing throughput and memory: every stage on a sample-sized chunk and on one 10x its size.

    python bench/preprocess.py [--base 3] [--scale 10] [--repeats 3] [--threads 2]

The small chunk is the sample corpus's chunk 00 repeated --base times (3: more documents than one
4096-document row group, so every buffer is at its working size), the large one --scale times that.

Each stage runs in a child process, as under Snakemake; its time is measured inside the child around the
stage function (imports excluded) and its peak RSS is the child's own high-water mark (VmHWM). In the same run, raw
tiktoken `encode_ordinary_batch` encodes the same documents with the same threads:

- over the filtered texts, the very strings the tokenize stage encodes (target: filter + tokenize
  together at least 0.8x the raw tokenizer's throughput),
- the same texts through tiktoken's fastest path (encode_to_numpy, slices of documents per thread task, as
  the tokenize stage encodes, but with no file to read or write): how close the stage comes to the encoder, and
- over the original, uncut texts of the chunk, for scale.

Medians of --repeats rounds (a round runs every stage once); figures are MB of decompressed JSON lines
(filter), MB of text (tokenize, raw tokenizer) and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.corpus import sample_lines, write_chunk  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
args = json.loads(sys.argv[1])
stage = args.pop("stage")
if stage == "raw":
    import pyarrow.parquet as pq
    from pipeline.tokenizer import gpt2_encoding
    from pipeline.io import iter_lines
    import orjson
    if args["source"].endswith(".parquet"):
        texts = pq.read_table(args["source"]).column("text").to_pylist()
    else:
        texts = [orjson.loads(line)["text"] for _, line in iter_lines(args["source"])]
    enc = gpt2_encoding()
    enc.encode_ordinary("warm up")
    t = time.perf_counter()
    if args["api"] == "encode_ordinary_batch":
        tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=args["threads"])))
    else:  # the fastest way through tiktoken: ids as arrays, slices of documents per thread task
        from concurrent.futures import ThreadPoolExecutor
        def encode(part):
            return sum(len(enc.encode_to_numpy(text, disallowed_special=())) for text in part)
        with ThreadPoolExecutor(args["threads"]) as pool:
            tokens = sum(pool.map(encode, [texts[i:i + 256] for i in range(0, len(texts), 256)]))
    seconds = time.perf_counter() - t
    result = {{"tokens": tokens, "bytes": sum(len(x.encode()) for x in texts)}}
else:
    import importlib
    module = importlib.import_module("pipeline." + stage)
    from pipeline.tokenizer import gpt2_encoding
    gpt2_encoding()  # load the ranks before the clock starts, as the raw tokenizer does
    positional = args.pop("positional")
    t = time.perf_counter()
    result = module.run(*positional, **args)
    seconds = time.perf_counter() - t
# peak RSS of this process's own memory (VmHWM; ru_maxrss would include the parent's at fork)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "result": result, "rss_mb": hwm / 1024}}, default=str))
"""


def run_child(stage: str, **kwargs) -> tuple[float, dict, float]:
    """(seconds, the stage's result, peak RSS in MB) of one stage run in a fresh process."""
    code = CHILD.format(root=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps({"stage": stage, **kwargs})],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed")
    data = json.loads(out.strip().splitlines()[-1])
    return data["seconds"], data["result"], data["rss_mb"]


def bench_chunk(folder: Path, src: Path, repeats: int, threads: int) -> dict:
    """Median seconds and max peak RSS of each stage, and of the raw tokenizer, on one chunk."""
    work = folder / src.name.split(".")[0]
    paths = {"filtered": work / "filtered.parquet", "tokenized": work / "tokenized.parquet",
             "sharded": work / "sharded", "val_sharded": work / "val_sharded"}
    plan = [
        ("filter", "filter", dict(positional=[str(src), str(paths["filtered"]), str(work / "filtered.json")],
                                  pile_sets_to_use=["Gutenberg (PG-19)", "Github", "Wikipedia (en)", "DM Mathematics",
                                                    "OpenSubtitles", "FreeLaw"], min_len_words=16, max_len_words=256)),
        ("tokenize", "tokenize", dict(positional=[str(paths["filtered"]), str(paths["tokenized"]),
                                                  str(work / "tok.json")], max_len_tokens=512, threads=threads)),
        ("shard", "shard", dict(positional=[str(paths["tokenized"]), str(paths["sharded"])],
                                max_num_of_tokens_in_batch=2100, tokens_per_shard=262144)),
        ("split", "split", dict(positional=[[str(paths["sharded"])], str(paths["sharded"]), str(work / "train.json"),
                                            str(work / "val.arrow"), str(work / "split.json")],
                                num_of_docs=200, seed=1)),
        ("raw tiktoken, filtered texts", "raw",
         dict(source=str(paths["filtered"]), threads=threads, api="encode_ordinary_batch")),
        ("tiktoken to_numpy, filtered", "raw",
         dict(source=str(paths["filtered"]), threads=threads, api="encode_to_numpy")),
        ("raw tiktoken, original texts", "raw", dict(source=str(src), threads=threads, api="encode_ordinary_batch")),
    ]
    # Rounds of every stage in turn rather than each stage `repeats` times: this machine's speed drifts over
    # minutes, and the ratios compare runs that sat side by side.
    runs: dict[str, list] = {name: [] for name, _, _ in plan}
    for _ in range(repeats):
        for name, stage, kwargs in plan:
            runs[name].append(run_child(stage, **json.loads(json.dumps(kwargs))))
    rows = {name: {"seconds": statistics.median(r[0] for r in rs), "result": rs[0][1], "rss_mb": max(r[2] for r in rs)}
            for name, rs in runs.items()}
    ratios = [raw[0] / (f[0] + t[0]) for f, t, raw in
              zip(runs["filter"], runs["tokenize"], runs["raw tiktoken, filtered texts"])]
    return rows, ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=int, default=3, help="the small chunk is sample chunk 00 this many times")
    ap.add_argument("--scale", type=int, default=10, help="the large chunk is the small one this many times")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    lines = sample_lines("00") * args.base
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chunks = {"1x": write_chunk(tmp / "small.jsonl.zst", lines),
                  f"{args.scale}x": write_chunk(tmp / "large.jsonl.zst", lines * args.scale)}
        json_mb = {k: sum(len(x) + 1 for x in lines) * (1 if k == "1x" else args.scale) / 1e6 for k in chunks}
        print(f"threads={args.threads}, repeats={args.repeats} (medians), python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cores")
        results = {}
        for label, src in chunks.items():
            rows, ratios = bench_chunk(tmp, src, args.repeats, args.threads)
            results[label] = rows
            tok = rows["tokenize"]["result"]
            text_mb = rows["raw tiktoken, filtered texts"]["result"]["bytes"] / 1e6
            print(f"\nchunk {label}: {json_mb[label]:.1f} MB of JSON lines, {rows['filter']['result']['docs_in']} "
                  f"documents -> {tok['docs']} kept, {text_mb:.1f} MB of text, {tok['tokens']:,} tokens")
            print(f"{'stage':32} {'seconds':>8} {'MB/s':>8} {'Mtok/s':>8} {'peak RSS MB':>12}")
            for name, row in rows.items():
                s = row["seconds"]
                if name == "filter":
                    mb, tokens = json_mb[label], None
                elif name.startswith("raw"):
                    mb, tokens = row["result"]["bytes"] / 1e6, row["result"]["tokens"]
                else:
                    mb, tokens = text_mb, tok["tokens"]
                print(f"{name:32} {s:8.3f} {mb / s:8.1f} {(tokens or 0) / s / 1e6:8.2f} {row['rss_mb']:12.0f}")
            ratio = statistics.median(ratios)
            print(f"filter+tokenize throughput / raw tiktoken's (same documents, {args.threads} threads): "
                  f"{ratio:.2f}x, median of the rounds' ratios (rounds: {', '.join(f'{r:.2f}' for r in ratios)})  "
                  f"[target >= 0.8: {'PASS' if ratio >= 0.8 else 'FAIL'}]")
            ceiling = rows["tiktoken to_numpy, filtered"]["seconds"]
            print(f"tokenize alone / tiktoken's fastest path, encode_to_numpy on slices with no I/O: "
                  f"{ceiling / rows['tokenize']['seconds']:.2f}x; raw encode_ordinary_batch / tokenize: "
                  f"{rows['raw tiktoken, filtered texts']['seconds'] / rows['tokenize']['seconds']:.2f}x")
        small, large = results["1x"], results[f"{args.scale}x"]
        print(f"\npeak RSS, {args.scale}x chunk / 1x chunk (target: flat, every job < 1024 MB):")
        for name in ("filter", "tokenize", "shard", "split"):
            a, b = small[name]["rss_mb"], large[name]["rss_mb"]
            print(f"  {name:10} {a:6.0f} MB -> {b:6.0f} MB  ({b / a:.2f}x)  {'PASS' if b < 1024 else 'FAIL'}")


if __name__ == "__main__":
    main()
