"""The Pile -> a trained GPT-2: filter, tokenize, shard, split, train, evaluate, report.

    snakemake --cores 2                     # everything, on the sample corpus (config.ini)
    snakemake --cores 2 tokenize            # every stage up to and including tokenize
    snakemake --cores 2 split --forcerun tokenize_chunk   # redo one stage (and what follows it)
    snakemake --cores 16 --config ini=configs/pile-gpt2-small.ini

Each rule names its inputs, outputs, the config values it depends on (params: an edit reruns it) and the
code it runs (an edit of that module reruns it); the work is done by functions in pipeline/ and model/.
"""

import os
import re
import sys

sys.path.insert(0, workflow.basedir)

import pipeline.filter, pipeline.shard, pipeline.split, pipeline.tokenize  # not bare names: the Snakefile
from pipeline import config as cfg  # shares its globals with Snakemake's own module (filter!)
from pipeline.chunks import select_chunks

INI = config.get("ini") or ("config.ini" if os.path.exists("config.ini") else f"{workflow.basedir}/config.ini")
S = cfg.load_settings(INI)  # stops here, before any job, on a wrong value
PRE = S.preprocessing
TRAIN_CHUNKS, VAL_CHUNK, CHUNK_PATHS = select_chunks(S)
CHUNKS = list(CHUNK_PATHS)
WORK = str(PRE.path_to_store_preprocessed_data)
CKPT = str(S.train.folder_to_save_state_dicts)
RESULTS = str(S.val.results_dir)


def source(*names):
    """Source files a rule runs: editing one of them reruns the rule (Snakemake does not see imports)."""
    # relative to the working directory, so that a moved or copied checkout does not rerun everything
    return [os.path.relpath(os.path.join(workflow.basedir, name)) for name in names]


STAGE_IO = "pipeline/io.py"
MODEL_CODE = source("model/gpt.py", "model/checkpoint.py", "model/device.py")
TRAIN_CODE = source("model/train.py", "model/loss.py", "model/data.py", "model/optim.py", "model/run.py",
                    "model/signals.py", "model/hf.py")
# [train] init_from's weights, when they are local files: replacing them reruns training
INIT_FROM = [S.train.init_from] if S.train.init_from and os.path.exists(S.train.init_from) else []

wildcard_constraints:
    chunk="|".join(re.escape(c) for c in CHUNKS),


rule all:
    input:
        f"{RESULTS}/perplexity.json",
        f"{RESULTS}/plots/training.png",


rule filter_chunk:
    """Keep documents of pile_sets_to_use with at least min_len_words words; cut to max_len_words."""
    input:
        chunk=lambda wc: CHUNK_PATHS[wc.chunk],
        code=source("pipeline/filter.py", STAGE_IO),
    output:
        data=f"{WORK}/filtered/{{chunk}}.parquet",
        manifest=f"{WORK}/filtered/{{chunk}}.json",
    params:
        pile_sets_to_use=list(PRE.pile_sets_to_use),
        min_len_words=PRE.min_len_words,
        max_len_words=PRE.max_len_words,
    threads: 2  # the parser, plus zstd decompression and the Parquet writer on threads of their own (~1.3 cores)
    log:
        f"{WORK}/logs/filter/{{chunk}}.log",
    run:
        pipeline.filter.run(input.chunk, output.data, output.manifest, **params, log=log[0])


rule tokenize_chunk:
    """GPT-2 BPE, <|endoftext|> first, cut to max_len_tokens; keeps each document's subset and bytes."""
    input:
        filtered=rules.filter_chunk.output.data,
        code=source("pipeline/tokenize.py", "pipeline/tokenizer.py", "pipeline/gpt2.tiktoken", STAGE_IO),
    output:
        data=f"{WORK}/tokenized/{{chunk}}.parquet",
        manifest=f"{WORK}/tokenized/{{chunk}}.json",
    params:
        max_len_tokens=PRE.max_len_tokens,
    threads: 2
    log:
        f"{WORK}/logs/tokenize/{{chunk}}.log",
    run:
        pipeline.tokenize.run(input.filtered, output.data, output.manifest, **params, threads=threads, log=log[0])


rule shard_chunk:
    """Batches of same-length documents (no padding) in shard files of tokens_per_shard tokens."""
    input:
        tokenized=rules.tokenize_chunk.output.data,
        code=source("pipeline/shard.py", "pipeline/shards.py", STAGE_IO),
    output:
        directory(f"{WORK}/sharded/{{chunk}}"),
    params:
        max_num_of_tokens_in_batch=PRE.max_num_of_tokens_in_batch,
        tokens_per_shard=PRE.tokens_per_shard,
    threads: 2  # pyarrow decodes the Parquet input on threads of its own (~1.6 cores)
    log:
        f"{WORK}/logs/shard/{{chunk}}.log",
    run:
        pipeline.shard.run(input.tokenized, output[0], **params, log=log[0])


rule split:
    """Validation: ~num_of_docs documents in whole random batches of the val chunk, minus any that occur in
    training. Training: the shards of the first num_of_chunks_to_use other chunks."""
    input:
        train=expand(f"{WORK}/sharded/{{chunk}}", chunk=TRAIN_CHUNKS),
        val=f"{WORK}/sharded/{VAL_CHUNK}",
        code=source("pipeline/split.py", "pipeline/shards.py", STAGE_IO),
    output:
        train=f"{WORK}/split/train.json",
        val=f"{WORK}/split/val.arrow",
        manifest=f"{WORK}/split/manifest.json",
    params:
        num_of_docs=S.val.num_of_docs,
        seed=S.val.seed,
    threads: 1
    log:
        f"{WORK}/logs/split.log",
    run:
        pipeline.split.run(input.train, input.val, output.train, output.val, output.manifest, **params, log=log[0])


# Stage targets: `snakemake --cores N STAGE` runs every stage up to and including STAGE.
rule filter:
    input:
        expand(rules.filter_chunk.output.manifest, chunk=CHUNKS),


rule tokenize:
    input:
        expand(rules.tokenize_chunk.output.manifest, chunk=CHUNKS),


rule shard:
    input:
        expand(rules.shard_chunk.output[0], chunk=CHUNKS),


rule train:
    """One epoch (or [train] epochs) of GPT-2 from scratch; resumes from the last checkpoint of this run.
    Only final.pt is declared, so Snakemake never deletes the checkpoints beside it."""
    input:
        train=rules.split.output.train,
        val=rules.split.output.val,
        init_from=INIT_FROM,
        code=MODEL_CODE + TRAIN_CODE,
    output:
        f"{CKPT}/final.pt",
    params:
        train=cfg.as_plain_dict(S.train),
        architecture=cfg.as_plain_dict(S.architecture),
    threads: lambda wc: workflow.resource_settings.cores or 1  # all of --cores; a cluster profile sets it (set-threads)
    resources:
        gpu=0 if S.train.device == "cpu" else S.train.nproc_per_node,  # one per DDP process; what a cluster allocates
    log:
        f"{CKPT}/logs/train.log",
    run:
        from model import train

        train.launch(INI, input.train, input.val, output[0], threads=threads, log=log[0])


rule evaluate:
    """Perplexity, bits per byte and the seed's document-averaged perplexity, overall and per subset."""
    input:
        model=rules.train.output[0],
        val=rules.split.output.val,
        code=MODEL_CODE + source("model/evaluate.py", "model/loss.py", "pipeline/tokenizer.py"),  # bytes per token, for bits per byte
    output:
        json=f"{RESULTS}/perplexity.json",
        table=f"{RESULTS}/perplexity.md",
    params:
        start_predicting_from_what_token=S.train.start_predicting_from_what_token,
        device=S.train.device,
        dtype=S.train.dtype,
    threads: lambda wc: workflow.resource_settings.cores or 1  # all of --cores; a cluster profile sets it (set-threads)
    resources:
        gpu=0 if S.train.device == "cpu" else 1,  # one process; without a GPU on its node it evaluates on the CPU
    log:
        f"{RESULTS}/logs/evaluate.log",
    run:
        from model import evaluate

        evaluate.run(input.model, input.val, output.json, output.table, **params, threads=threads, log=log[0])


rule report:
    """Plots of the training metrics and of perplexity per subset (also in `snakemake --report`)."""
    input:
        model=rules.train.output[0],
        perplexity=rules.evaluate.output.json,
        code=source("model/report.py"),
    output:
        training=report(f"{RESULTS}/plots/training.png", caption="report/training.rst", category="Training"),
        throughput=report(f"{RESULTS}/plots/throughput.png", caption="report/throughput.rst", category="Training"),
        perplexity=report(f"{RESULTS}/plots/perplexity.png", caption="report/perplexity.rst", category="Evaluation"),
    log:
        f"{RESULTS}/logs/report.log",
    run:
        from model import report as plots

        plots.run(input.model, input.perplexity, output.training, output.throughput, output.perplexity, log=log[0])


rule export_hf:
    """The final model as a Hugging Face GPT-2 folder: GPT2LMHeadModel config, safetensors, GPT-2's tokenizer
    built from the shipped ranks; [inference] becomes generation_config.json."""
    input:
        model=rules.train.output[0],
        code=MODEL_CODE + source("model/hf.py", "model/export.py", "pipeline/tokenizer.py", "pipeline/gpt2.tiktoken"),
    output:
        directory(f"{RESULTS}/hf"),
    params:
        inference=cfg.as_plain_dict(S.inference),
    threads: 1
    log:
        f"{RESULTS}/logs/export_hf.log",
    run:
        from model import export as hf_export  # not a bare `export`: the name of the target rule below

        hf_export.run(input.model, output[0], **params, log=log[0])


rule lm_eval_docs:
    """The validation documents as text (the tokens the workflow scores, decoded) for eval/'s lm-eval task."""
    input:
        val=rules.split.output.val,
        code=source("model/export.py", "pipeline/tokenizer.py", "pipeline/gpt2.tiktoken", STAGE_IO),
    output:
        docs=f"{RESULTS}/lm_eval/val.jsonl",
        manifest=f"{RESULTS}/lm_eval/manifest.json",
    threads: 1
    log:
        f"{RESULTS}/logs/lm_eval_docs.log",
    run:
        from model import export as hf_export

        hf_export.write_lm_eval_docs(input.val, output.docs, output.manifest, log=log[0])


rule export:
    """`snakemake --cores N export`: the Hugging Face folder and the documents of eval/pile_gpt2_val.yaml."""
    input:
        rules.export_hf.output[0],
        rules.lm_eval_docs.output.docs,
