"""A scale rehearsal of the full Pile: a synthetic corpus shaped like it, every stage through Snakemake, and the
projection of what the original's run (17 chunks, GPT-2 small) costs.

    python bench/rehearsal.py [--scale 1e-4] [--cores N] [--out work/rehearsal]

The corpus: 30 numbered chunks and val, each document one of the Pile's 22 subsets, drawn in the
proportions of the Pile paper's Table 1 (Gao et al. 2020, arXiv:2101.00027: each subset's weight, i.e. its
share of the released, epoch-weighted train set, and its mean document size). A real chunk holds
1254.20 GiB / 30 = 44.9 GB of text; a rehearsal chunk holds `scale` of that: the number of documents is
scaled, their lengths are not (lognormal around each subset's mean, sigma 1: the table gives means only).
Texts are slices of the shipped sample corpus (public-domain and permissively licensed text labelled with six
of the subsets' names, see data/sample/README.md; the same label's text where the sample has it), so filtering
and tokenizing see real prose and code, not the Pile's own. val is a chunk of the same mixture at 1/30 of a train
chunk's size (the Pile config validates on chunk 29 and does not read it).

The workflow runs with configs/pile-gpt2-small.ini, changed only where a rehearsal must: paths, the
shard size and the step-counting keys (warmup, attenuation, checkpoint and validation intervals) scaled by
`scale`, the model the small default config's (config.ini [architecture]) on the CPU, so that training takes
minutes; GPT-2 small's training time is projected from FLOPs instead (6 x parameters x tokens over a GPU's
datasheet bfloat16 FLOP/s).

Measured: each job's wall time and peak RSS (VmHWM of its processes,
sampled from /proc), each preprocessing stage's function time and peak RSS re-run on chunk 00 in a process of
its own, the trainer's open files, disk per stage; the projection divides by `scale`. The default scale
(1e-4: about 2.7 M training tokens) is sized by the small model's training rate on 2 cores (README: 2,370 to
3,356 tokens/s), which dominates: roughly 15 to 20 minutes of training on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import iter_lines  # noqa: E402

# The Pile paper, Table 1: subset -> (weight in % of the train set, mean document size in KiB).
PILE_TABLE = {
    "Pile-CC": (18.11, 4.33), "PubMed Central": (14.40, 30.55), "Books3": (12.07, 538.36),
    "OpenWebText2": (10.01, 3.85), "ArXiv": (8.96, 46.61), "Github": (7.59, 5.25), "FreeLaw": (6.12, 15.06),
    "StackExchange": (5.13, 2.16), "USPTO Backgrounds": (3.65, 4.08), "PubMed Abstracts": (3.07, 1.30),
    "Gutenberg (PG-19)": (2.17, 398.73), "OpenSubtitles": (1.55, 30.48), "Wikipedia (en)": (1.53, 1.11),
    "DM Mathematics": (1.24, 8.00), "Ubuntu IRC": (0.88, 545.48), "BookCorpus2": (0.75, 369.87),
    "EuroParl": (0.73, 68.87), "HackerNews": (0.62, 4.92), "YoutubeSubtitles": (0.60, 22.55),
    "PhilPapers": (0.38, 73.37), "NIH ExPorter": (0.30, 2.11), "Enron Emails": (0.14, 1.78),
}
PILE_TEXT_BYTES = 1254.20 * 2**30  # Table 1's total effective size: the 30 train chunks
PILE_CHUNKS = 30
CHUNK_BYTES = PILE_TEXT_BYTES / PILE_CHUNKS
SIGMA = 1.0  # lognormal spread of document lengths around each subset's mean (an assumption: see above)

# Datasheet dense bfloat16 tensor-core FLOP/s (without sparsity) of two common training GPUs.
GPUS = {"NVIDIA A100 SXM4 80 GB": 312e12, "NVIDIA H100 SXM5 80 GB": 989e12}
STAGES = ("filter_chunk", "tokenize_chunk", "shard_chunk", "split", "train", "evaluate", "report")


# ---------------------------------------------------------------------------------------------------------
# The corpus

def text_pools() -> dict[str, str]:
    """The sample corpus's text per subset label; '' holds all of it, for the subsets it lacks."""
    by_subset: dict[str, list[str]] = {}
    for name in ("00.jsonl.zst", "01.jsonl.zst"):
        for _, line in iter_lines(ROOT / "data" / "sample" / name):
            doc = orjson.loads(line)
            by_subset.setdefault(doc["meta"]["pile_set_name"], []).append(doc["text"])
    pools = {k: "\n\n".join(v) for k, v in by_subset.items()}
    pools[""] = "\n\n".join(pools.values())
    return pools


def write_chunk(path: Path, n_bytes: float, pools: dict[str, str], rng: np.random.Generator) -> dict:
    """One chunk of about n_bytes of text in the Pile's mixture, streamed into a .jsonl.zst (atomically)."""
    names = list(PILE_TABLE)
    weight = np.array([PILE_TABLE[k][0] for k in names]) / 100
    mean = np.array([PILE_TABLE[k][1] for k in names]) * 1024
    counts = rng.poisson(weight * n_bytes / mean)  # expected documents per subset: bytes share / mean size
    subset = np.repeat(np.arange(len(names)), counts)
    rng.shuffle(subset)
    mu = np.log(mean) - SIGMA**2 / 2  # a lognormal with this mu has mean `mean`
    lengths = np.maximum(1, rng.lognormal(mu[subset], SIGMA)).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp")
    text_bytes = 0
    with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as out:
        for k, n in zip(subset.tolist(), lengths.tolist()):
            pool = pools.get(names[k], pools[""])
            start = int(rng.integers(0, len(pool)))
            if start + n <= len(pool):
                text = pool[start:start + n]
            else:  # wrap around (a document longer than the pool repeats it); copies only for these
                text = (pool * ((start + n) // len(pool) + 1))[start:start + n]
            text_bytes += len(text)
            out.write(orjson.dumps({"text": text, "meta": {"pile_set_name": names[k]}}) + b"\n")
    os.replace(tmp, path)
    return {"docs": int(len(subset)), "text_chars": text_bytes, "zst_bytes": path.stat().st_size}


def make_corpus(folder: Path, scale: float, seed: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    pools = text_pools()
    info = {}
    for i, name in enumerate([f"{c:02d}" for c in range(PILE_CHUNKS)] + ["val"]):
        size = CHUNK_BYTES * scale / (PILE_CHUNKS if name == "val" else 1)
        info[name] = write_chunk(folder / f"{name}.jsonl.zst", size, pools, np.random.default_rng([seed, i]))
    return info


# ---------------------------------------------------------------------------------------------------------
# The configuration

def rehearsal_ini(path: Path, folder: Path, scale: float) -> Path:
    pile = configparser.ConfigParser(interpolation=None)
    pile.optionxform = str
    pile.read(ROOT / "configs" / "pile-gpt2-small.ini")
    small = configparser.ConfigParser(interpolation=None)
    small.optionxform = str
    small.read(ROOT / "config.ini")
    pre, train = pile["preprocessing"], pile["train"]
    pre["path_to_original_data"] = str(folder / "corpus")
    pre["path_to_store_preprocessed_data"] = str(folder / "work")
    # the shard count per chunk of the real run: tokens_per_shard scaled (at least one batch)
    batch, shard = int(pre["max_num_of_tokens_in_batch"]), int(pre["tokens_per_shard"])
    pre["tokens_per_shard"] = str(max(batch, round(shard * scale)))
    pile["val"]["results_dir"] = str(folder / "results")
    train["folder_to_save_state_dicts"] = str(folder / "checkpoints")
    for key in ("warmup_steps", "steps_to_attenuate_lr_to_zero"):
        train[key] = str(max(10, round(int(train[key]) * scale)))
    # at least 200 steps apart, 10 batches: validation and checkpoints must not dominate a run of minutes
    for key in ("checkpoint_every_steps", "val_every_steps"):
        train[key] = str(max(200, round(int(train[key]) * scale)))
    train["val_batches"] = "10"
    train.update({"device": "cpu", "compile": "false", "dtype": "auto"})
    pile["architecture"] = dict(small["architecture"])
    with open(path, "w") as fh:
        pile.write(fh)
    return path


# ---------------------------------------------------------------------------------------------------------
# Measuring

class Sampler(threading.Thread):
    """Every 0.2 s: the RSS of Snakemake and its children; per rule, the largest peak RSS (VmHWM) of a process
    of one of its jobs (Snakemake 9 runs each job as a process `snakemake --target-jobs RULE:...`, the trainer
    a child of that); the trainer's open files."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil  # a dependency of Snakemake

        self.root = psutil.Process(pid)
        self.peak_tree_rss = self.trainer_hwm = self.trainer_fds = 0
        self.rule_hwm: dict[str, int] = {}
        self.job_seen: dict[str, list[float]] = {}  # job -> [first, last] time a sample saw its process
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.wait(0.2):
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            rss, now = 0, time.monotonic()
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    hwm = vm_hwm(p.pid)
                    cmd = p.cmdline()
                    if "model.train" in cmd:
                        self.trainer_fds = max(self.trainer_fds, p.num_fds())
                        self.trainer_hwm = max(self.trainer_hwm, hwm)
                    job = next((q for q in [p] + p.parents() if "--target-jobs" in q.cmdline()), None)
                    if job is not None:
                        args = job.cmdline()
                        target = args[args.index("--target-jobs") + 1]
                        rule = target.split(":")[0]
                        self.rule_hwm[rule] = max(self.rule_hwm.get(rule, 0), hwm)
                        self.job_seen.setdefault(target, [now, now])[1] = now
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, StopIteration, ValueError):
                    continue
            self.peak_tree_rss = max(self.peak_tree_rss, rss)


def vm_hwm(pid: int) -> int:
    """A process's peak resident memory so far, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return 1024 * next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))


def job_times(sampler: Sampler) -> list[dict]:
    """(rule, seconds) of every job: how long the sampler saw its process (to 0.2 s; Snakemake's start-up of
    the job's process included, as every job pays it). Snakemake's metadata records are no use here: their
    `starttime` is written when the job ends."""
    return [{"rule": target.split(":")[0], "seconds": last - first + 0.2}
            for target, (first, last) in sampler.job_seen.items()]


CHILD = r"""
import importlib, json, sys, time
sys.path.insert(0, {root!r})
args = json.loads(sys.argv[1])
module = importlib.import_module(args.pop("module"))
from pipeline.tokenizer import gpt2_encoding
gpt2_encoding()  # the ranks loaded before the clock starts
t = time.perf_counter()
module.run(*args.pop("positional"), **args)
seconds = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "rss_mb": hwm / 1024}}))
"""


def isolated(module: str, *positional, **kwargs) -> dict:
    """Seconds of the stage function and peak RSS (VmHWM) of one job, in a process of its own."""
    args = json.dumps({"module": module, "positional": [str(p) for p in positional], **kwargs})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1e-4, help="fraction of a real chunk's size (default 1e-4)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="Snakemake --cores (default: all)")
    p.add_argument("--out", default="work/rehearsal", help="folder of the corpus, the run and the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--until", default="all", choices=("all", "split"),
                   help="split: preprocessing only, for its throughput at scales too large to train on a CPU")
    a = p.parse_args(argv)
    folder = Path(a.out).resolve()
    s = a.scale
    started = time.perf_counter()

    t = time.perf_counter()
    corpus = make_corpus(folder / "corpus", s, a.seed)
    corpus_seconds = time.perf_counter() - t
    print(f"corpus: {sum(c['docs'] for c in corpus.values()):,} documents in {len(corpus)} chunks, "
          f"{du(folder / 'corpus') / 1e6:.1f} MB zst, {corpus_seconds:.0f} s", flush=True)
    ini = rehearsal_ini(folder / "rehearsal.ini", folder, s)

    cmd = [str(Path(sys.executable).parent / "snakemake"), a.until, "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(folder), "--cores", str(a.cores), "--config", f"ini={ini}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(folder / "snakemake.log", "w"), stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop.set()
    workflow_seconds = time.perf_counter() - t
    if rc != 0:
        print(f"snakemake failed (exit {rc}); see {folder / 'snakemake.log'}", file=sys.stderr)
        return 1

    from pipeline.config import load_settings

    settings = load_settings(ini)
    work = settings.preprocessing.path_to_store_preprocessed_data
    split = orjson.loads((work / "split" / "manifest.json").read_bytes())
    train_tokens = split["train"]["tokens"]
    chunks = split["train"]["chunks"] + [split["val"]["chunk"]]
    jobs = job_times(sampler)

    # one job of each preprocessing stage again, alone, for its function time and peak RSS
    iso = folder / "isolated"
    iso.mkdir(exist_ok=True)
    pre = settings.preprocessing
    raw00 = folder / "corpus" / "00.jsonl.zst"
    isolated_runs = {
        "filter_chunk": isolated("pipeline.filter", raw00, iso / "f.parquet", iso / "f.json",
                                 pile_sets_to_use=list(pre.pile_sets_to_use), min_len_words=pre.min_len_words,
                                 max_len_words=pre.max_len_words),
        "tokenize_chunk": isolated("pipeline.tokenize", iso / "f.parquet", iso / "t.parquet", iso / "t.json",
                                   max_len_tokens=pre.max_len_tokens, threads=2),
        "shard_chunk": isolated("pipeline.shard", iso / "t.parquet", iso / "sharded",
                                max_num_of_tokens_in_batch=pre.max_num_of_tokens_in_batch,
                                tokens_per_shard=pre.tokens_per_shard),
    }
    for stage in isolated_runs:
        isolated_runs[stage]["input_bytes"] = du({"filter_chunk": raw00, "tokenize_chunk": iso / "f.parquet",
                                                  "shard_chunk": iso / "t.parquet"}[stage])
    tokens00 = orjson.loads((iso / "t.json").read_bytes())["tokens"]
    text00 = orjson.loads((iso / "f.json").read_bytes())

    stages = {}
    for rule in STAGES:
        mine = [j for j in jobs if j["rule"] == rule]
        threads = {"tokenize_chunk": 2, "train": a.cores, "evaluate": a.cores}.get(rule, 1)
        stages[rule] = {"jobs": len(mine), "threads": threads, "wall_s": sum(j["seconds"] for j in mine),
                        "core_s": sum(j["seconds"] for j in mine) * threads,
                        "peak_rss_per_job": sampler.rule_hwm.get(rule, 0)}
    text_bytes = sum(corpus[c]["text_chars"] for c in chunks)
    tokenized_tokens = sum(orjson.loads((work / "tokenized" / f"{c}.json").read_bytes())["tokens"] for c in chunks)
    raw_bytes = sum(du(settings.preprocessing.path_to_original_data / f"{c}.jsonl.zst") for c in chunks)
    disk = {"raw .jsonl.zst (18 chunks read)": raw_bytes,
            "filtered": du(work / "filtered"), "tokenized": du(work / "tokenized"), "sharded": du(work / "sharded"),
            "split (val.arrow; train.json lists the shards)": du(work / "split")}
    run_dir = next(Path(settings.train.folder_to_save_state_dicts).glob("run-*"), folder / "not-trained")
    ckpts = sorted(run_dir.glob("step_*.pt"))
    n_shards = sum(len(c["shards"]) for c in orjson.loads((work / "split" / "train.json").read_bytes())["chunks"])

    # the projection: GPT-2 small over the tokens the full run would train on
    from model.gpt import GPT
    from pipeline.config import Architecture

    pile = configparser.ConfigParser(interpolation=None)
    pile.optionxform = str
    pile.read(ROOT / "configs" / "pile-gpt2-small.ini")
    arch = Architecture(**{k: int(v) for k, v in pile["architecture"].items()})
    n_params = GPT(arch).num_params()
    full_tokens = train_tokens / s
    flops = 6 * n_params * full_tokens

    result = {
        "scale": s, "cores": a.cores, "machine": os.uname().nodename, "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "corpus": {"chunks": len(corpus), "docs": sum(c["docs"] for c in corpus.values()),
                   "zst_bytes": du(folder / "corpus"), "seconds": corpus_seconds},
        "train_tokens": train_tokens, "text_bytes_read": text_bytes, "tokenized_tokens": tokenized_tokens,
        "train_docs": split["train"]["docs"], "chunks_read": len(chunks),
        "filter_chunk_00": {"docs_in": text00.get("docs_in"), "docs_kept": text00.get("docs_kept"),
                            "tokens": tokens00},
        "stages": stages, "isolated_chunk_00": isolated_runs, "disk": disk,
        "train": {"peak_rss": sampler.trainer_hwm, "max_open_files": sampler.trainer_fds, "shards": n_shards,
                  "metrics_bytes": du(run_dir / "metrics.jsonl") if run_dir.exists() else 0,
                  "checkpoint_bytes": ckpts[-1].stat().st_size if ckpts else 0},
        "snakemake_tree_peak_rss": sampler.peak_tree_rss, "workflow_seconds": workflow_seconds,
        "projection": {
            "train_tokens": full_tokens, "gpt2_small_parameters": n_params, "flops": flops,
            "core_hours": {k: v["core_s"] / s / 3600 for k, v in stages.items()
                           if k in ("filter_chunk", "tokenize_chunk", "shard_chunk", "split")},
            "core_hours_from_isolated_chunk_00": {k: v["seconds"] * (2 if k == "tokenize_chunk" else 1)
                                                  * len(chunks) / s / 3600 for k, v in isolated_runs.items()},
            "disk_bytes": {k: v / s for k, v in disk.items()},
            "gpu_hours_at_100_percent_mfu": {g: flops / f / 3600 for g, f in GPUS.items()},
        },
        "total_seconds": time.perf_counter() - started,
    }
    (folder / "rehearsal.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(markdown(result))
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def markdown(r: dict) -> str:
    s, P = r["scale"], r["projection"]
    out = [f"Rehearsal at scale {s:g} ({r['corpus']['docs']:,} documents in {r['corpus']['chunks']} chunks, "
           f"{r['corpus']['zst_bytes'] / 1e6:.1f} MB zst), {r['cpu']}, --cores {r['cores']}, {r['date']}; "
           f"workflow {r['workflow_seconds'] / 60:.1f} min, {r['train_tokens']:,} training tokens.", "",
           "| stage | jobs | wall s (sum) | core-s | per core | peak RSS of a job | isolated chunk 00: s, peak RSS |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    per_core = {"filter_chunk": (r["text_bytes_read"], "MB of text/s"),
                "tokenize_chunk": (r["tokenized_tokens"], "k tokens/s"),
                "shard_chunk": (r["tokenized_tokens"], "k tokens/s"),
                "split": (r["train_tokens"], "k tokens/s"), "train": (r["train_tokens"], "k tokens/s")}
    for name, st in r["stages"].items():
        rate = ""
        if name in per_core and st["core_s"] > 0:
            amount, unit = per_core[name]
            rate = f"{amount / st['core_s'] / (1e6 if 'MB' in unit else 1e3):,.2f} {unit}"
        iso = r["isolated_chunk_00"].get(name)
        iso_text = f"{iso['seconds']:.2f} s, {iso['rss_mb']:.0f} MB" if iso else ""
        out.append(f"| {name} | {st['jobs']} | {st['wall_s']:.1f} | {st['core_s']:.1f} | {rate} | "
                   f"{st['peak_rss_per_job'] / 1e6:,.0f} MB | {iso_text} |")
    t = r["train"]
    out += ["", f"Trainer: peak RSS {t['peak_rss'] / 1e6:.0f} MB, at most {t['max_open_files']} open files for "
                f"{t['shards']} shards; metrics.jsonl {t['metrics_bytes'] / 1e3:.0f} kB; a checkpoint "
                f"{t['checkpoint_bytes'] / 1e6:.1f} MB (the small model). Snakemake and its jobs together: peak "
                f"RSS {r['snakemake_tree_peak_rss'] / 1e6:.0f} MB.", "",
            "| data | bytes | per training token | projected, full run |", "|---|---:|---:|---:|"]
    for k, v in r["disk"].items():
        out.append(f"| {k} | {v / 1e6:,.1f} MB | {v / r['train_tokens']:.2f} | {v / s / 1e9:,.0f} GB |")
    out += ["", f"Projection (÷ {s:g}): {P['train_tokens'] / 1e9:,.1f} B training tokens; "
                f"GPT-2 small ({P['gpt2_small_parameters'] / 1e6:.1f} M parameters): 6·N·D = {P['flops']:.2e} FLOP.",
            "", "| stage | core-hours (Snakemake jobs) | core-hours (isolated chunk 00 × chunks) |", "|---|---:|---:|"]
    for k, v in P["core_hours"].items():
        iso = P["core_hours_from_isolated_chunk_00"].get(k)
        out.append(f"| {k} | {v:,.0f} | {'' if iso is None else f'{iso:,.0f}'} |")
    out += ["", "| GPU (datasheet dense bf16) | hours at 100% MFU | at 50% | at 30% |", "|---|---:|---:|---:|"]
    for g, h in P["gpu_hours_at_100_percent_mfu"].items():
        out.append(f"| {g} ({GPUS[g] / 1e12:.0f} TFLOP/s) | {h:,.0f} | {h / 0.5:,.0f} | {h / 0.3:,.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
