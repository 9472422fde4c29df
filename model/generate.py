"""Text generation: greedy search, beam search or sampling, with a KV cache.

    python -m model.generate --prompt "The history of the Roman Empire" --prompt "def fibonacci(n):"
    python -m model.generate --prompt "Once upon a time" --method sampling --temperature 0.8 --top-p 0.9
    python -m model.generate --prompt "It was" --method beam_search --beam-size 8 --tokens 40

Settings come from config.ini [inference]; a flag overrides one. A prompt is encoded after an
<|endoftext|> start token, as every training document begins; generation stops at <|endoftext|> or after
how_many_tokens_to_generate new tokens. Prompts of equal token length are decoded as one batch.

With the KV cache (the default) the prompt is read once and each new token costs one position's forward pass,
whatever the prompt's length; without it (`use_cache=False`, kept for tests and bench/generate.py) every new
token re-reads the whole sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path

import torch

from model.device import autocast, resolve_device, resolve_precision
from pipeline.config import EOT, VOCAB_SIZE

METHODS = ("greedy_search", "beam_search", "sampling")


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, or no room left in the context)."""


def encode_prompt(text: str, context: int, n_new: int, number: int = 1) -> list[int]:
    """<|endoftext|> + the prompt's GPT-2 tokens, cut on the left so that the new tokens fit in the context."""
    from pipeline.tokenizer import gpt2_encoding

    if not text or not text.strip():
        raise PromptError(f"prompt {number} is empty; give some text to continue")
    if n_new > context - 2:  # the start token and at least one prompt token must fit
        raise PromptError(f"how_many_tokens_to_generate = {n_new} leaves no room for a prompt in the model's context "
                          f"of {context} positions; ask for at most {context - 2}")
    ids = [EOT] + gpt2_encoding().encode(text, disallowed_special=())
    budget = context - n_new  # positions left for the prompt
    if len(ids) > budget:
        kept = budget - 1
        warnings.warn(f"prompt {number} has {len(ids) - 1} tokens; with {n_new} new tokens the model's context of "
                      f"{context} positions holds only its last {kept} tokens, so generation continues from those",
                      stacklevel=2)
        ids = [EOT] + ids[len(ids) - kept:]
    return ids


def last_logits(model, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
    """(B, V) logits of the last position only: the output projection of the other positions is never needed
    for generation (with or without a cache), and it is most of the work of a small model's forward pass."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        return model.lm_head(model.hidden_states(idx, kv_cache)[:, -1])[..., :VOCAB_SIZE]
    return model(idx, kv_cache=kv_cache)[:, -1] if kv_cache is not None else model(idx)[:, -1]


class Stepper:
    """Next-token logits of a batch of equal-length sequences: from a KV cache, or by re-reading everything."""

    def __init__(self, model, prompts: torch.Tensor, max_len: int, use_cache: bool = True, dtype: str = "float32"):
        self.model, self.use_cache, self.dtype = model, use_cache, dtype
        self.device = prompts.device
        self.seq = prompts
        self.cache = model.new_kv_cache(prompts.shape[0], max_len) if use_cache else None

    def _forward(self, idx):
        with autocast(self.device, self.dtype):
            return last_logits(self.model, idx, self.cache).float()

    def first(self) -> torch.Tensor:
        """(B, V) logits of the token after each prompt."""
        return self._forward(self.seq)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append (B,) tokens; (B, V) logits of the token after them."""
        tokens = tokens.to(self.device).view(-1, 1)
        if self.cache is None:
            self.seq = torch.cat([self.seq, tokens], dim=1)
            return self._forward(self.seq)
        return self._forward(tokens)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch, in that order (beam search)."""
        index = index.to(self.device)
        self.seq = self.seq[index]
        if self.cache is not None:
            self.cache.reorder(index)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens drawn from softmax(logits / temperature) cut to top_k and top_p (on the CPU,
    so a seed gives the same draws on every device)."""
    logits = logits.detach().float().cpu() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first token always stays)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def _decode_batch(model, prompts: list[list[int]], n_new: int, choose, use_cache: bool, dtype: str,
                  stop_at_eot: bool) -> list[list[int]]:
    """Greedy search or sampling for prompts of one length: `choose` maps (B, V) logits to (B,) tokens."""
    device = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    stepper = Stepper(model, idx, idx.shape[1] + n_new, use_cache, dtype)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits = stepper.first()
    for k in range(n_new):
        tokens = choose(logits).cpu()
        for r, t in enumerate(tokens.tolist()):
            if done[r]:
                continue
            if stop_at_eot and t == EOT:
                done[r] = True
            else:
                out[r].append(t)
        if all(done) or k == n_new - 1:
            break
        logits = stepper.step(tokens)
    return out


def beam_search(model, prompt: list[int], n_new: int, beam_size: int, use_cache: bool = True,
                dtype: str = "float32", stop_at_eot: bool = True, length_penalty: float = 1.0) -> list[int]:
    """The best continuation that beam search finds, by sum of log p / (new tokens) ** length_penalty.

    Each step extends every live beam by every token and keeps the beam_size best by sum of log p; a hypothesis
    that picks <|endoftext|> is finished (that token counted in its length). The search ends when beam_size
    hypotheses are finished or after n_new tokens; with length_penalty 0 also as soon as a finished hypothesis
    beats every live one (sums only fall as a hypothesis grows). Then the best finished or live hypothesis
    wins. length_penalty 0 is the plain probability, which favours ending early; 1 is the mean log p per token.
    With beam_size 1 this is greedy search.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([prompt] * beam_size, dtype=torch.long, device=device)
    stepper = Stepper(model, idx, idx.shape[1] + n_new, use_cache, dtype)
    # float64: adding the beam's score never reorders two tokens' log-probabilities
    scores = torch.full((beam_size,), -math.inf, dtype=torch.float64)
    scores[0] = 0.0  # the beams start as copies of one prompt: expand only the first
    seqs: list[list[int]] = [[] for _ in range(beam_size)]
    finished: list[tuple[float, int, list[int]]] = []  # (sum of log p, length, tokens)
    logits = stepper.first()
    for k in range(n_new):
        logp = torch.log_softmax(logits.double().cpu(), dim=-1)
        vocab = logp.shape[-1]
        top_scores, top_ids = (scores[:, None] + logp).view(-1).topk(min(2 * beam_size, beam_size * vocab))
        live: list[tuple[float, int, int]] = []
        for s, i in zip(top_scores.tolist(), top_ids.tolist()):
            if s == -math.inf:
                break
            b, t = divmod(i, vocab)
            if stop_at_eot and t == EOT:
                finished.append((s, len(seqs[b]) + 1, seqs[b]))
            else:
                live.append((s, b, t))
                if len(live) == beam_size:
                    break
        if not live or len(finished) >= beam_size:
            break
        if length_penalty == 0 and finished and max(f[0] for f in finished) >= live[0][0]:
            break
        seqs = [seqs[b] + [t] for _, b, t in live]
        if k == n_new - 1:
            finished.extend((s, len(seq), seq) for (s, _, _), seq in zip(live, seqs))
            break
        n_live = len(live)
        scores = torch.full((beam_size,), -math.inf, dtype=torch.float64)
        scores[:n_live] = torch.tensor([s for s, _, _ in live], dtype=torch.float64)
        index = [b for _, b, _ in live] + [live[0][1]] * (beam_size - n_live)  # pad rows stay at -inf
        tokens = [t for _, _, t in live] + [live[0][2]] * (beam_size - n_live)
        seqs += [list(seqs[0]) for _ in range(beam_size - n_live)]
        stepper.reorder(torch.tensor(index, dtype=torch.long))
        logits = stepper.step(torch.tensor(tokens, dtype=torch.long))
    if not finished:
        return []
    return max(finished, key=lambda f: f[0] / f[1] ** length_penalty)[2]


def generate(model, prompts: list[list[int]], n_new: int, method: str = "greedy_search", beam_size: int = 4,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 1234,
             use_cache: bool = True, dtype: str = "float32", stop_at_eot: bool = True,
             length_penalty: float = 1.0) -> list[list[int]]:
    """New tokens for each prompt (token lists, <|endoftext|> first), without the stopping <|endoftext|>."""
    if method not in METHODS:
        raise ValueError(f"inference_method {method!r} is not one of {', '.join(METHODS)}")
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    with torch.inference_mode():
        if method == "beam_search":
            for i, p in enumerate(prompts):
                out[i] = beam_search(model, p, n_new, beam_size, use_cache, dtype, stop_at_eot, length_penalty)
            return out
        if method == "greedy_search":
            def choose(logits):
                return logits.argmax(dim=-1)
        else:
            gen = torch.Generator().manual_seed(seed)

            def choose(logits):
                return sample_next(logits, temperature, top_k, top_p, gen)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length in sorted(by_length):
            rows = by_length[length]
            for i, new in zip(rows, _decode_batch(model, [prompts[i] for i in rows], n_new, choose, use_cache,
                                                  dtype, stop_at_eot)):
                out[i] = new
    return out


def generate_text(model, arch, texts: list[str], settings, use_cache: bool = True, dtype: str = "float32") -> list[str]:
    """Completions of prompt texts with [inference] `settings` (a pipeline.config.Inference)."""
    from pipeline.tokenizer import gpt2_encoding

    n_new = settings.how_many_tokens_to_generate
    prompts = [encode_prompt(t, arch.positional_encoding_max_pos, n_new, i + 1) for i, t in enumerate(texts)]
    new = generate(model, prompts, n_new, settings.inference_method, settings.beam_size, settings.temperature,
                   settings.top_k, settings.top_p, settings.seed, use_cache=use_cache, dtype=dtype,
                   length_penalty=settings.length_penalty)
    enc = gpt2_encoding()
    return [enc.decode(tokens) for tokens in new]


FLAGS = {  # command-line flag -> [inference] key
    "tokens": "how_many_tokens_to_generate", "method": "inference_method", "beam_size": "beam_size",
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
    "length_penalty": "length_penalty",
}


def main(argv=None) -> int:
    from model.checkpoint import ModelFileError, load_gpt
    from pipeline.config import ConfigError, load_settings

    p = argparse.ArgumentParser(prog="python -m model.generate", description="Continue prompts with a trained GPT.")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    p.add_argument("--model", help="model file, Hugging Face GPT-2 folder or hub id in the local cache "
                                    "(default: [train] folder_to_save_state_dicts/final.pt)")
    p.add_argument("--ini", default="config.ini", help="config file (default: config.ini)")
    p.add_argument("--tokens", type=int, help="[inference] how_many_tokens_to_generate")
    p.add_argument("--method", help="[inference] inference_method: greedy_search | beam_search | sampling")
    p.add_argument("--beam-size", type=int, help="[inference] beam_size")
    p.add_argument("--length-penalty", type=float, help="[inference] length_penalty (beam_search)")
    p.add_argument("--temperature", type=float, help="[inference] temperature")
    p.add_argument("--top-k", type=int, help="[inference] top_k")
    p.add_argument("--top-p", type=float, help="[inference] top_p")
    p.add_argument("--seed", type=int, help="[inference] seed")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: [train] device)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default: [train] dtype)")
    p.add_argument("--no-cache", action="store_true", help="re-read the whole sequence for every new token (slow)")
    args = p.parse_args(argv)
    try:
        s = load_settings(args.ini)
        overrides = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
        inference = dataclasses.replace(s.inference, **overrides)
        flag_of = {key: "--" + flag.replace("_", "-") for flag, key in FLAGS.items()}

        def err(key, msg):
            where = flag_of[key] if key in overrides else f"{s.path} [inference] {key}"
            raise ConfigError(f"{where}: {msg}")

        inference.validate(err)
        device = resolve_device(args.device or s.train.device)
        dtype = resolve_precision(args.dtype or s.train.dtype, device).dtype
        path = Path(args.model) if args.model else s.train.folder_to_save_state_dicts / "final.pt"
        # a Hugging Face folder (or hub id in the local cache) brings its own architecture in config.json
        model, arch, _ = load_gpt(path, map_location=device,
                                  expected_arch=s.architecture if path.is_file() else None)
        model.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            completions = generate_text(model, arch, args.prompt, inference, use_cache=not args.no_cache,
                                        dtype=dtype)
    except (ConfigError, ModelFileError, ValueError, OSError) as e:
        hint = ("; give the --ini of the run that trained it" if "another architecture" in str(e) else "")
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    how = inference.inference_method + (f" (beam_size {inference.beam_size})" if inference.inference_method ==
                                        "beam_search" else "")
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions), 1):
        print(f"--- {i}/{len(completions)}, {how}, up to {inference.how_many_tokens_to_generate} new tokens:")
        print(f"{prompt}\033[1m{completion}\033[0m" if sys.stdout.isatty() else f"{prompt}{completion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
