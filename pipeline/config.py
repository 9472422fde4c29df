"""config.ini -> typed, validated settings, checked once before any job runs.

Every key of every section is declared here, with its type and default; the INI file may leave a key out
(it gets the default) but may not name a key that is not declared (a typo would otherwise be ignored).
Errors name the file, the section and the key: `config.ini [preprocessing] min_len_words: ...`.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

# The 22 subsets of The Pile, spelled exactly as in `meta.pile_set_name`. The position of a name in this
# tuple is its id in shard files (int8), so the order is fixed forever: append only.
PILE_SET_NAMES = (
    "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw", "StackExchange",
    "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)",
    "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles",
    "PhilPapers", "NIH ExPorter", "Enron Emails",
)
PILE_SET_ID = {name: i for i, name in enumerate(PILE_SET_NAMES)}

EOT = 50256          # GPT-2's <|endoftext|>: the start token of every document and the end of every target
VOCAB_SIZE = 50257   # GPT-2's vocabulary, kept so checkpoints interoperate with GPT-2's


class ConfigError(ValueError):
    """A config.ini value that cannot work; the message names file, section and key."""


def _key(help_: str, **kw):
    return field(metadata={"help": help_}, **kw)


@dataclass(frozen=True)
class Preprocessing:
    path_to_original_data: Path = _key("folder of the Pile chunks: NN.jsonl.zst, val.jsonl.zst or plain .jsonl")
    path_to_store_preprocessed_data: Path = _key("folder for every stage's outputs (filtered/, tokenized/, ...)")
    pile_sets_to_use: tuple[str, ...] = _key("'|'-separated pile_set_name values to keep")
    max_len_words: int = _key("keep the first max_len_words whitespace words of a document", default=256)
    min_len_words: int = _key("drop documents of fewer whitespace words", default=16)
    max_len_tokens: int = _key("keep the first max_len_tokens BPE tokens (the start token not counted)",
                               default=512)
    max_num_of_tokens_in_batch: int = _key("token budget of one batch: docs x (length + 1)", default=2100)
    tokens_per_shard: int = _key("token budget of one shard file (whole batches, never exceeded)",
                                 default=16_777_216)

    def validate(self, err):
        for name in self.pile_sets_to_use:
            if name not in PILE_SET_ID:
                close = difflib.get_close_matches(name, PILE_SET_NAMES, n=1, cutoff=0.3)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the subsets are: {', '.join(PILE_SET_NAMES)}"
                err("pile_sets_to_use", f"{name!r} is not a Pile subset{hint}")
        if not self.pile_sets_to_use:
            err("pile_sets_to_use", "names no subset")
        for key in ("max_len_words", "min_len_words", "max_len_tokens", "max_num_of_tokens_in_batch",
                    "tokens_per_shard"):
            if getattr(self, key) < 1:
                err(key, f"must be at least 1, not {getattr(self, key)}")
        if self.min_len_words > self.max_len_words:
            err("min_len_words", f"{self.min_len_words} is larger than max_len_words ({self.max_len_words})")
        longest = self.max_len_tokens + 1  # the start token counts in a batch's budget
        if self.max_num_of_tokens_in_batch < longest:
            err("max_num_of_tokens_in_batch",
                f"{self.max_num_of_tokens_in_batch} cannot hold one document of max_len_tokens + 1 = {longest} tokens")
        if self.tokens_per_shard < self.max_num_of_tokens_in_batch:
            err("tokens_per_shard",
                f"{self.tokens_per_shard} is smaller than one batch (max_num_of_tokens_in_batch = "
                f"{self.max_num_of_tokens_in_batch})")


@dataclass(frozen=True)
class Val:
    data_from_what_chunk_to_use: str = _key("chunk (file stem) that validation documents come from", default="val")
    num_of_docs: int = _key("about this many validation documents, in whole batches", default=10000)
    seed: int = _key("seed of the random choice of validation batches", default=1234)
    results_dir: Path = _key("folder of perplexity.json, the Markdown table and the plots", default=Path("results"))

    def validate(self, err):
        if self.num_of_docs < 1:
            err("num_of_docs", f"must be at least 1, not {self.num_of_docs}")


@dataclass(frozen=True)
class Train:
    folder_to_save_state_dicts: Path = _key("folder of checkpoints (one sub-folder per run) and final.pt",
                                            default=Path("checkpoints"))
    epochs: int = _key("passes over the training chunks", default=1)
    num_of_chunks_to_use: int = _key("train on the first N chunks in numeric order, the validation chunk excluded",
                                     default=17)
    max_lr: float = _key("peak learning rate of AdamW", default=2.5e-4)
    warmup_steps: int = _key("linear warm-up over this many batches (the original's optimizer steps, one batch "
                             "each; counted in batches whatever nproc_per_node and tokens_per_optimizer_step)",
                             default=40000)
    steps_to_attenuate_lr_to_zero: int = _key("cosine decay: lr reaches 0 this many batches after warm-up",
                                              default=11_500_000)
    weight_decay: float = _key("AdamW weight decay (2-D weights only unless weight_decay_all_parameters)",
                               default=0.01)
    weight_decay_all_parameters: bool = _key("decay biases and LayerNorm gains too, as the original did",
                                             default=False)
    shuffle_chunks: bool = _key("shuffle the order of the chunks each epoch (false: in order, as the original)",
                                default=False)
    P_drop: float = _key("dropout probability (embeddings and residual branches)", default=0.1)
    attention_dropout: bool = _key("also drop attention weights with P_drop, as GPT-2 does (false: as the original)",
                                   default=False)
    init_std: float = _key("std of the normal initialisation", default=0.02)
    scale_residual_init: bool = _key("residual output projections initialised with init_std / sqrt(2 N), as GPT-2 "
                                     "(false: N(0, init_std) everywhere, as the original)", default=True)
    start_predicting_from_what_token: int = _key("the loss ignores the first N positions of each document",
                                                 default=8)
    grad_clip: float = _key("clip the global gradient norm to this (0 = off)", default=1.0)
    tokens_per_optimizer_step: int = _key("accumulate gradients over batches up to this many tokens (0 = one batch)",
                                          default=0)
    init_from: str = _key("start from these weights instead of a random init: a model file or checkpoint (.pt), "
                          "a Hugging Face GPT-2 folder, or a hub id already in the local Hugging Face cache; its "
                          "architecture must equal [architecture] (empty: from scratch)", default="")
    device: str = _key("auto | cpu | cuda | cuda:N", default="auto")
    dtype: str = _key("auto | float32 | bfloat16 | float16: auto is bfloat16 where the device runs it natively "
                      "(CUDA with bf16, a CPU with AVX512-BF16/AMX or Arm BF16), float32 elsewhere; bfloat16 and "
                      "float16 are autocast (float16 with a grad scaler)", default="auto")
    compile: str = _key("auto | true | false: torch.compile the model (falls back to eager, with a warning, where "
                        "compiling fails); auto compiles on a GPU only: on a CPU the compiled step was 0.86x to "
                        "1.30x the eager one in bench/train.py, and a short CPU run pays the compile time; set true "
                        "for long CPU runs", default="auto")
    seed: int = _key("seed of initialisation, dropout and data order", default=1337)
    checkpoint_every_steps: int = _key("write a checkpoint every N optimizer steps (and at each chunk's end)",
                                       default=1000)
    keep_checkpoints: int = _key("keep the last N checkpoints of a run", default=3)
    nproc_per_node: int = _key("> 1: launch torchrun with this many processes (DDP)", default=1)
    val_every_steps: int = _key("validation loss every N optimizer steps (0 = off)", default=1000)
    val_batches: int = _key("batches of the val split used for that periodic validation loss", default=20)
    threads: int = _key("CPU threads for torch (0 = the rule's threads)", default=0)

    def compiles_on(self, device_type: str) -> bool:
        """Whether `compile` means torch.compile on this kind of device: true, or auto on a GPU."""
        mode = self.compile.lower()
        return mode == "true" or (mode == "auto" and device_type == "cuda")

    def validate(self, err):
        for key in ("epochs", "num_of_chunks_to_use", "checkpoint_every_steps", "keep_checkpoints",
                    "nproc_per_node", "val_batches"):
            if getattr(self, key) < 1:
                err(key, f"must be at least 1, not {getattr(self, key)}")
        for key in ("warmup_steps", "steps_to_attenuate_lr_to_zero", "start_predicting_from_what_token",
                    "tokens_per_optimizer_step", "val_every_steps", "threads"):
            if getattr(self, key) < 0:
                err(key, f"must be 0 or more, not {getattr(self, key)}")
        if not (self.max_lr > 0 and math.isfinite(self.max_lr)):
            err("max_lr", f"must be a positive number, not {self.max_lr}")
        if not 0 <= self.P_drop < 1:
            err("P_drop", f"must be in [0, 1), not {self.P_drop}")
        if self.init_std <= 0:
            err("init_std", f"must be positive, not {self.init_std}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            err("weight_decay" if self.weight_decay < 0 else "grad_clip", "must be 0 or more")
        if self.compile.lower() not in ("auto", "true", "false"):
            err("compile", f"{self.compile!r} is not one of auto, true, false")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            err("dtype", f"{self.dtype!r} is not one of auto, float32, bfloat16, float16")
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            err("device", f"{d!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class Architecture:
    N: int = _key("number of decoder blocks (n_layer)", default=12)
    d_model: int = _key("width of the residual stream (n_embd)", default=768)
    d_ff: int = _key("inner width of the feed-forward layer", default=3072)
    h: int = _key("attention heads (n_head)", default=12)
    d_k: int = _key("query/key width per head", default=64)
    d_v: int = _key("value width per head", default=64)
    positional_encoding_max_pos: int = _key("learned positions (n_ctx): max_len_tokens + 1 at least", default=513)

    def validate(self, err):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                err(f.name, f"must be at least 1, not {getattr(self, f.name)}")
        # GPT-2's layout (one c_attn of width 3 * d_model) needs h heads of d_k = d_v = d_model / h.
        if self.h * self.d_k != self.d_model:
            err("d_k", f"h * d_k = {self.h} * {self.d_k} must equal d_model = {self.d_model} (GPT-2 layout)")
        if self.d_v != self.d_k:
            err("d_v", f"must equal d_k ({self.d_k}) in GPT-2's layout, not {self.d_v}")


@dataclass(frozen=True)
class Inference:
    how_many_tokens_to_generate: int = _key("new tokens per prompt (stops early at <|endoftext|>)", default=20)
    inference_method: str = _key("greedy_search | beam_search | sampling", default="greedy_search")
    beam_size: int = _key("beams of beam_search", default=4)
    length_penalty: float = _key("beam_search ranks answers by sum log p / (new tokens) ** length_penalty "
                                 "(0 = plain probability, which favours ending early; 1 = mean log p)", default=1.0)
    temperature: float = _key("sampling temperature", default=1.0)
    top_k: int = _key("sample among the k most likely tokens (0 = all)", default=0)
    top_p: float = _key("nucleus sampling: smallest set of tokens with this much probability (1 = all)",
                        default=1.0)
    seed: int = _key("seed of sampling", default=1234)

    def validate(self, err):
        methods = ("greedy_search", "beam_search", "sampling")
        if self.inference_method not in methods:
            close = difflib.get_close_matches(self.inference_method, methods, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("inference_method", f"{self.inference_method!r} is not one of {', '.join(methods)}{hint}")
        if self.how_many_tokens_to_generate < 1 or self.beam_size < 1:
            err("how_many_tokens_to_generate" if self.how_many_tokens_to_generate < 1 else "beam_size",
                "must be at least 1")
        if self.temperature <= 0:
            err("temperature", f"must be positive, not {self.temperature}")
        if not math.isfinite(self.length_penalty):
            err("length_penalty", f"must be a number, not {self.length_penalty}")
        if self.top_k < 0:
            err("top_k", f"must be 0 or more, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            err("top_p", f"must be in (0, 1], not {self.top_p}")


SECTIONS = {"preprocessing": Preprocessing, "val": Val, "train": Train, "architecture": Architecture,
            "inference": Inference}


@dataclass(frozen=True)
class Settings:
    path: Path
    preprocessing: Preprocessing
    val: Val
    train: Train
    architecture: Architecture
    inference: Inference


def _convert(raw: str, typ, where: str):
    raw = raw.strip()
    try:
        if typ == "int":
            return int(raw.replace("_", ""))
        if typ == "float":
            return float(raw)
        if typ == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "Path":
            return Path(raw)
        if typ == "tuple[str, ...]":
            return tuple(part.strip() for part in raw.split("|") if part.strip())
        return raw
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a valid {typ}") from None


def load_settings(path: str | Path) -> Settings:
    """Parse and validate an INI file; raise ConfigError naming file, section and key on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive: N, P_drop
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e}") from None

    for section in parser.sections():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise ConfigError(f"{path} [{section}]: unknown section{hint}")

    parsed = {}
    for name, cls in SECTIONS.items():
        section = parser[name] if parser.has_section(name) else {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in section:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{path} [{name}] {key}: unknown key{hint}")
        values = {}
        for key, f in fields.items():
            where = f"{path} [{name}] {key}"
            if key in section:
                values[key] = _convert(section[key], f.type, where)
            elif f.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing (required: {f.metadata['help']})")
        obj = cls(**values)

        def err(key, msg, _name=name):
            raise ConfigError(f"{path} [{_name}] {key}: {msg}")

        obj.validate(err)
        parsed[name] = obj

    settings = Settings(path=path, **parsed)
    pre, arch, train = settings.preprocessing, settings.architecture, settings.train
    if arch.positional_encoding_max_pos < pre.max_len_tokens + 1:
        raise ConfigError(
            f"{path} [architecture] positional_encoding_max_pos: {arch.positional_encoding_max_pos} is shorter than "
            f"the longest document, [preprocessing] max_len_tokens + 1 = {pre.max_len_tokens + 1}")
    if train.start_predicting_from_what_token >= pre.max_len_tokens + 1:
        raise ConfigError(
            f"{path} [train] start_predicting_from_what_token: {train.start_predicting_from_what_token} leaves "
            f"no position to predict in documents of at most max_len_tokens + 1 = {pre.max_len_tokens + 1} tokens")
    return settings


def as_plain_dict(section) -> dict:
    """A section as plain JSON-able values (for Snakemake params, manifests and checkpoint snapshots)."""
    out = {}
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out
