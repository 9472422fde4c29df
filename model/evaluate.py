"""Perplexity of a model on the validation split: token perplexity, bits per byte and the seed's
document-averaged perplexity, overall and per Pile subset.

    python -m model.evaluate --model checkpoints/final.pt            # [val] results_dir/perplexity.{json,md}
    python -m model.evaluate --model checkpoints/run-x/step_00001000.pt --out results/step1000
    python -m model.evaluate --model results/hf --out results/hf-eval    # a Hugging Face GPT-2 folder

For every validation document of L tokens (t_0 = <|endoftext|>, t_1 ... t_{L-1}), position i predicts
t_{i+1}, and the last position predicts <|endoftext|>, as in training. Positions i < start
(`start_predicting_from_what_token`) are context only. The two kinds of figure score different positions:

    token-weighted (perplexity, mean_loss, bits_per_byte)   positions start ... L-1: every target the training
                                                            loss sees, the final <|endoftext|> included
    document_averaged_perplexity                            positions start ... L-2: the original ppl.py's,
                                                            which never scores the final <|endoftext|> target

After a cut at max_len_words or max_len_tokens that final target sits mid-sentence: a hard prediction, which
the original did not score. Per document we keep sums, never means, so per-subset figures add up
exactly to the overall ones:

    tokens     L - start                              predicted tokens (token-weighted figures)
    nll        sum of -ln p(target)                   nats, over the same positions
    bytes      UTF-8 bytes of the predicted targets   see BYTES_NOTE
    log2_mean  sum over positions start ... L-2 of    the document's mean -log2 p at the original's positions
               -ln p / (L - 1 - start) / ln 2

    perplexity                      exp(sum nll / sum tokens)           (mean_loss = sum nll / sum tokens)
    bits_per_byte                   sum nll / ln 2 / sum bytes
    document_averaged_perplexity    2 ** (mean over documents of log2_mean)   (the original project's figure)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EOT, PILE_SET_NAMES
from pipeline.io import atomic_output, log_file, progress, write_json
from pipeline.shards import ShardReader
from pipeline.tokenizer import token_byte_lengths

from model.device import autocast, resolve_device, resolve_precision, set_threads
from model.loss import token_nll_chunked

BYTES_NOTE = (
    "bits_per_byte divides the NLL of the predicted tokens (in nats, / ln 2) by the UTF-8 bytes those "
    "predicted target tokens stand for (GPT-2's byte-level BPE: each token id is a fixed byte string; the "
    "final <|endoftext|> target is 0 bytes). The first start_predicting_from_what_token positions are context: "
    "their targets are neither scored nor counted in bytes. documents_bytes is the shard's n_bytes (the whole "
    "document's text), for reference.")

UNTRAINED_TOKENS = 16384  # about this many tokens of the split for the untrained model's baseline

DEFINITIONS = {
    "perplexity": "exp(sum NLL / sum predicted tokens): token-weighted, natural log",
    "mean_loss": "sum NLL / sum predicted tokens, in nats (the training loss)",
    "bits_per_byte": "sum NLL / ln 2 / sum bytes of the predicted tokens (comparable across tokenizers)",
    "document_averaged_perplexity": "2 ** (mean over documents of the document's mean -log2 p over positions "
                                    "start ... L-2): the original project's figure (its 19.35) at the original "
                                    "ppl.py's positions, never the final <|endoftext|> target; short documents "
                                    "weigh as much as long ones",
    "position_i_predicts": "token i+1; the last position (L-1) predicts <|endoftext|>",
    "positions_scored": "perplexity, mean_loss and bits_per_byte score positions start ... L-1 of each document "
                        "of L tokens (the final <|endoftext|> target included, as the training loss does); "
                        "document_averaged_perplexity scores start ... L-2 (the original's positions)",
    "documents_averaged": "documents in document_averaged_perplexity: those with at least one position in "
                          "start ... L-2",
    "untrained": "a freshly initialised model of the same architecture (seed 0), on every k-th batch of the "
                 "split (about 16k tokens; its documents and tokens are counted in its figures)",
}


# ---------------------------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------------------------

def targets_of(tokens: np.ndarray) -> np.ndarray:
    """(n, L) documents -> (n, L) targets: position i predicts token i+1, the last position <|endoftext|>."""
    targets = np.empty_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    targets[:, -1] = EOT
    return targets


@torch.inference_mode()
def token_nll(model, tokens: np.ndarray, device: torch.device, dtype: str = "float32") -> np.ndarray:
    """(n, L) documents -> (n, L) float64 -ln p(target of each position), in nats."""
    idx = torch.from_numpy(tokens.astype(np.int64)).to(device)
    tgt = torch.from_numpy(targets_of(tokens).astype(np.int64)).to(device)
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        # the blocks under autocast, the output layer in float32 (bfloat16 logits, 3 significant digits, would
        # blur the log-probabilities this function exists to measure), chunk by chunk of tokens: never the
        # (tokens x 50,257) logit matrix
        with autocast(device, dtype):
            hidden = model.hidden_states(idx)
        return token_nll_chunked(hidden.float(), model.lm_head.weight.float(), tgt).double().cpu().numpy()
    with autocast(device, dtype):
        logits = model(idx)
    out = torch.empty(idx.shape, dtype=torch.float64)
    # one document at a time: a float32 log-softmax of the whole batch would double the logits' memory
    for r in range(idx.shape[0]):
        nll = F.cross_entropy(logits[r].float(), tgt[r], reduction="none")
        out[r] = nll.double().cpu()
    return out.numpy()


def document_sums(nll: np.ndarray, tokens: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Per document of a batch: predicted tokens, sum NLL (nats) and bytes of the predicted targets at positions
    start ... L-1; and tokens and sum NLL at the original's positions start ... L-2 (no final <|endoftext|>)."""
    n, L = tokens.shape
    lengths = token_byte_lengths()
    predicted = max(L - start, 0)
    targets = targets_of(tokens)[:, start:]
    return {
        "tokens": np.full(n, predicted, dtype=np.int64),
        "nll": nll[:, start:].sum(axis=1),
        "bytes": lengths[targets].sum(axis=1).astype(np.int64) if predicted else np.zeros(n, np.int64),
        "averaged_tokens": np.full(n, max(L - 1 - start, 0), dtype=np.int64),
        "averaged_nll": nll[:, start:L - 1].sum(axis=1),
    }


class Tally:
    """Sums over documents; figures() turns them into the reported numbers. Tallies add up (+)."""

    FIELDS = ("documents", "documents_skipped", "tokens", "nll", "bytes", "documents_bytes", "documents_averaged",
              "log2_mean_sum")

    def __init__(self):
        self.documents = self.documents_skipped = self.tokens = self.bytes = self.documents_bytes = 0
        self.documents_averaged = 0
        self.nll = self.log2_mean_sum = 0.0

    def add(self, tokens: int, nll: float, n_bytes: int, documents_bytes: int,
            averaged_tokens: int | None = None, averaged_nll: float | None = None) -> None:
        """One document: tokens, nll and n_bytes at positions start ... L-1; averaged_tokens and averaged_nll at
        the original's positions start ... L-2 (for the document average; default: the same as tokens, nll)."""
        tokens, nll = int(tokens), float(nll)
        if tokens == 0:  # a document no longer than start: nothing to predict
            self.documents_skipped += 1
            return
        self.documents += 1
        self.tokens += int(tokens)
        self.nll += float(nll)
        self.bytes += int(n_bytes)
        self.documents_bytes += int(documents_bytes)
        averaged_tokens = tokens if averaged_tokens is None else int(averaged_tokens)
        averaged_nll = nll if averaged_nll is None else float(averaged_nll)
        if averaged_tokens > 0:  # only the final <|endoftext|> after start: nothing at the original's positions
            self.documents_averaged += 1
            self.log2_mean_sum += averaged_nll / averaged_tokens / math.log(2)

    def __add__(self, other: Tally) -> Tally:
        out = Tally()
        for f in self.FIELDS:
            setattr(out, f, getattr(self, f) + getattr(other, f))
        return out

    def figures(self) -> dict:
        t, b, d = self.tokens, self.bytes, self.documents_averaged
        mean_loss = self.nll / t if t else float("nan")
        return {
            "documents": self.documents,
            "documents_skipped_too_short": self.documents_skipped,
            "documents_averaged": d,
            "tokens": t,
            "bytes": b,
            "documents_bytes": self.documents_bytes,
            "nll_nats": self.nll,
            "mean_loss": mean_loss,
            "perplexity": math.exp(mean_loss) if t else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / b if b else float("nan"),
            "document_averaged_perplexity": 2 ** (self.log2_mean_sum / d) if d else float("nan"),
            "log2_mean_sum": self.log2_mean_sum,
        }


def evaluate_model(model, val_shard: str | Path, start: int, device: torch.device, dtype: str = "float32",
                   logfh=None, desc: str = "evaluate", context: int | None = None,
                   every: int = 1) -> dict[str, Tally]:
    """{pile_set_name: Tally} over every document of the val shard (inference mode, one shard batch at a time);
    every > 1: only batches 0, every, 2 * every, ... (whole batches, spread over the split)."""
    reader = ShardReader(val_shard)
    tallies: dict[str, Tally] = {}
    model.eval()
    chosen = range(0, len(reader), every)
    sizes = reader.seq_lens() * reader.n_docs()
    bar = progress(logfh or sys.stderr, desc, "tok", total=int(sizes[list(chosen)].sum()))
    with bar:
        for i in chosen:
            batch = reader[i]
            n, L = batch.tokens.shape
            if context is not None and L > context:
                raise ValueError(f"{val_shard}: documents of {L} tokens do not fit the model's context of {context} "
                                 "positions ([architecture] positional_encoding_max_pos)")
            sums = document_sums(token_nll(model, batch.tokens, device, dtype), batch.tokens, start)
            for j in range(n):
                name = PILE_SET_NAMES[int(batch.pile_set[j])]
                tallies.setdefault(name, Tally()).add(sums["tokens"][j], sums["nll"][j], sums["bytes"][j],
                                                      batch.n_bytes[j], sums["averaged_tokens"][j],
                                                      sums["averaged_nll"][j])
            bar.update(n * L)
    return tallies


def overall(tallies: dict[str, Tally]) -> Tally:
    total = Tally()
    for t in tallies.values():
        total = total + t
    return total


def results(tallies: dict[str, Tally], untrained: dict[str, Tally] | None = None) -> dict:
    """The figures of perplexity.json: overall and per subset (subsets in PILE_SET_NAMES order)."""
    order = sorted(tallies, key=PILE_SET_NAMES.index)
    out = {"overall": overall(tallies).figures(), "per_subset": {k: tallies[k].figures() for k in order}}
    if untrained is not None:
        out["untrained"] = {"overall": overall(untrained).figures(),
                            "per_subset": {k: untrained[k].figures() for k in order if k in untrained}}
    return out


def positions_note(start: int) -> str:
    """Which positions each figure scores, in words, for perplexity.md."""
    return (f"Mean loss, perplexity and bits per byte score positions {start} ... L-1 of each document of L tokens: "
            f"the final `<|endoftext|>` target is included, as in training. The document-averaged perplexity "
            f"scores positions {start} ... L-2, the original project's (its `ppl.py` never scores the final "
            f"`<|endoftext|>`).")


def markdown_table(res: dict) -> str:
    """Per subset, overall and (if present) the untrained model's overall row, as a Markdown table."""
    head = ("| subset | documents | tokens | mean loss (nats) | perplexity | bits per byte "
            "| document-averaged perplexity |\n|---|---:|---:|---:|---:|---:|---:|\n")

    def row(name, f):
        return (f"| {name} | {f['documents']:,} | {f['tokens']:,} | {f['mean_loss']:.4f} | {f['perplexity']:,.2f} "
                f"| {f['bits_per_byte']:.4f} | {f['document_averaged_perplexity']:,.2f} |\n")

    lines = [row(name, f) for name, f in res["per_subset"].items()]
    lines.append(row("**overall**", res["overall"]))
    if "untrained" in res:
        lines.append(row("untrained model (same architecture)", res["untrained"]["overall"]))
    return head + "".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

def untrained_model(arch, init_std: float = 0.02, scale_residual_init: bool = True, seed: int = 0):
    """A freshly initialised model of the architecture (the 'before training' baseline), seeded."""
    from model.gpt import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(arch, init_std=init_std, scale_residual_init=scale_residual_init)


def _init_settings(meta: dict) -> dict:
    """The run's [train] init_std and scale_residual_init if the model file records them (a Hugging Face
    config's initializer_range), else GPT-2's: 0.02, scaled residual projections."""
    found = {"init_std": 0.02, "scale_residual_init": True}
    if isinstance(meta.get("hf_config"), dict) and "initializer_range" in meta["hf_config"]:
        found["init_std"] = float(meta["hf_config"]["initializer_range"])
    for key in ("train", "settings", "config"):
        section = meta.get(key)
        if isinstance(section, dict):
            section = section.get("train", section)
            if isinstance(section, dict):
                found.update({k: type(found[k])(section[k]) for k in found if k in section})
    return found


def evaluation_device(name: str, strict: bool, log) -> torch.device:
    """The device to evaluate on. [train] device names where training runs; evaluate may land elsewhere (a CPU
    node of a cluster, a laptop): a CUDA device this machine lacks then means the CPU, with a warning in the
    log, since the same model evaluates on either. strict (an explicit --device): that device or an error."""
    if not strict and name.startswith("cuda") and not torch.cuda.is_available():
        print(f"warning: [train] device = {name}, but this machine has no CUDA GPU: evaluating on the CPU",
              file=log, flush=True)
        return torch.device("cpu")
    return resolve_device(name)


def run(model_path, val_shard, out_json, out_table, start_predicting_from_what_token: int, device: str = "auto",
        dtype: str = "auto", threads: int = 0, log=None, *, expected_arch=None, untrained_baseline: bool = True,
        strict_device: bool = False):
    """Evaluate model_path on val_shard; write perplexity.json and the Markdown table; print the table."""
    from model.checkpoint import load_gpt

    set_threads(threads)
    start = int(start_predicting_from_what_token)
    with log_file(log) as logfh:
        dev = evaluation_device(device, strict_device, logfh)
        precision = resolve_precision(dtype, dev)
        dtype = precision.dtype
        model, arch, meta = load_gpt(model_path, map_location=dev, expected_arch=expected_arch)
        model.to(dev)
        context = arch.positional_encoding_max_pos
        print(f"{model_path}: {sum(p.numel() for p in model.parameters()):,} parameters, {arch}; "
              f"evaluating {val_shard} on {dev} ({dtype}: {precision.reason}), from token {start}", file=logfh)
        t0 = time.perf_counter()
        tallies = evaluate_model(model, val_shard, start, dev, dtype, logfh, context=context)
        seconds = time.perf_counter() - t0
        total = overall(tallies)
        print(f"{total.documents:,} documents, {total.tokens:,} predicted tokens in {seconds:.1f} s "
              f"({total.tokens / max(seconds, 1e-9):,.0f} tokens/s)", file=logfh)
        untrained = None
        if untrained_baseline:
            # A fresh model's perplexity is the vocabulary's size give or take 3%, on any text: a sample of the
            # batches (whole batches, spread over the split) shows it at a fraction of the cost.
            reader = ShardReader(val_shard)
            every = max(1, math.ceil(int((reader.seq_lens() * reader.n_docs()).sum()) / UNTRAINED_TOKENS))
            fresh = untrained_model(arch, **_init_settings(meta)).to(dev)
            untrained = evaluate_model(fresh, val_shard, start, dev, dtype, logfh, desc="untrained", context=context,
                                       every=every)
            del fresh
        res = results(tallies, untrained)
        doc = {
            "model": str(model_path),
            "model_step": meta.get("step"),
            "model_tokens": meta.get("tokens"),
            "architecture": {k: getattr(arch, k) for k in arch.__dataclass_fields__},
            "val_split": str(val_shard),
            "start_predicting_from_what_token": start,
            "device": dev.type,
            "dtype": dtype,
            "precision": precision.as_dict(),
            "definitions": {**DEFINITIONS, "bytes": BYTES_NOTE},
            **res,
        }
        table = markdown_table(res)
        write_json(out_json, doc)
        with atomic_output(out_table) as tmp:
            skipped = (f", {total.documents_skipped:,} with no position from {start} on left out"
                       if total.documents_skipped else "")
            tmp.write_text(f"Validation perplexity of `{model_path}` on `{val_shard}` "
                           f"({total.documents:,} documents{skipped}; positions from {start} on).\n\n"
                           f"{positions_note(start)}\n\n{table}", encoding="utf-8")
        if logfh is not sys.stderr:
            print(table, file=logfh)
    print(f"\nValidation perplexity ({model_path}, {total.documents:,} documents, positions from {start} on):\n")
    print(table, flush=True)
    return doc


def main(argv=None) -> int:
    from model.checkpoint import ModelFileError
    from pipeline.config import ConfigError, load_settings

    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model file: final.pt or any training checkpoint, or a Hugging Face GPT-2 "
                                    "folder or hub id in the local cache (its architecture is its own) "
                                    "(default: [train] folder_to_save_state_dicts/final.pt)")
    p.add_argument("--val", help="validation shard (default: [preprocessing] path_to_store_preprocessed_data"
                                 "/split/val.arrow)")
    p.add_argument("--ini", default="config.ini", help="config file (default: config.ini)")
    p.add_argument("--out", help="folder of perplexity.json and perplexity.md (default: [val] results_dir)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: [train] device)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default: [train] dtype)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-model baseline")
    args = p.parse_args(argv)
    try:
        s = load_settings(args.ini)
        model = Path(args.model) if args.model else s.train.folder_to_save_state_dicts / "final.pt"
        val = Path(args.val) if args.val else s.preprocessing.path_to_store_preprocessed_data / "split" / "val.arrow"
        if not val.is_file():
            raise ValueError(f"{val}: no such validation split (run `snakemake --cores N split` first, or give --val)")
        out = Path(args.out) if args.out else s.val.results_dir
        run(model, val, out / "perplexity.json", out / "perplexity.md", s.train.start_predicting_from_what_token,
            args.device or s.train.device, args.dtype or s.train.dtype, args.threads, log=None,
            # a model file of this project must match [architecture] (a wrong --ini is the usual cause); a
            # Hugging Face folder brings its own architecture in config.json
            expected_arch=s.architecture if model.is_file() else None, untrained_baseline=not args.no_untrained,
            strict_device=args.device is not None)
    except (ConfigError, ModelFileError, ValueError, OSError) as e:
        hint = ("; give the --ini of the run that trained it" if "another architecture" in str(e) else "")
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
