"""Generation: greedy, beam search and sampling, with and without the KV cache; prompts; the CLI."""

import math

import pytest
import torch

from model.checkpoint import save_model
from model.generate import encode_prompt, generate, main, sample_next
from model.gpt import GPT
from pipeline.config import EOT, VOCAB_SIZE, Architecture
from pipeline.tokenizer import gpt2_encoding
from tests.synthetic import write_tiny_ini

ARCH = Architecture(N=2, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
PATTERN = list(range(101, 111))  # a "document": EOT 101 102 ... 110, then EOT


def random_model(init_std=0.5, seed=0):
    """Untrained, with large weights so that the next-token distributions are peaked and varied."""
    torch.manual_seed(seed)
    return GPT(ARCH, init_std=init_std).eval()


@pytest.fixture(scope="module")
def pattern_model():
    """A tiny model trained (a few seconds) to continue any prefix of PATTERN and then end the document."""
    torch.manual_seed(0)
    model = GPT(ARCH)
    seq = torch.tensor([[EOT] + PATTERN + [EOT]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return model.eval()


PROMPTS = [[EOT, 5, 6, 7], [EOT, 8, 9, 10], [EOT, 300], [EOT] + list(range(1000, 1020))]


def test_greedy_with_and_without_cache_give_identical_tokens():
    model = random_model()
    with_cache = generate(model, PROMPTS, 30, use_cache=True, stop_at_eot=False)
    without = generate(model, PROMPTS, 30, use_cache=False, stop_at_eot=False)
    assert with_cache == without
    assert all(len(t) == 30 for t in with_cache)
    assert len({tuple(t) for t in with_cache}) == len(PROMPTS)  # the prompts matter


def test_several_prompts_at_once_equal_one_at_a_time():
    model = random_model()
    together = generate(model, PROMPTS, 15, stop_at_eot=False)
    alone = [generate(model, [p], 15, stop_at_eot=False)[0] for p in PROMPTS]
    assert together == alone


def test_greedy_continues_the_learned_pattern_and_stops_at_endoftext(pattern_model):
    out = generate(pattern_model, [[EOT] + PATTERN[:3], [EOT] + PATTERN[:6]], 20)
    assert out == [PATTERN[3:], PATTERN[6:]]  # the <|endoftext|> that ends it is not part of the output


def test_beam_search_with_beam_1_equals_greedy(pattern_model):
    for model in (random_model(), random_model(seed=1), pattern_model):
        greedy = generate(model, PROMPTS, 25)
        beam = generate(model, PROMPTS, 25, method="beam_search", beam_size=1)
        assert beam == greedy
    assert generate(pattern_model, [[EOT, 101, 102]], 20, method="beam_search", beam_size=1) == [PATTERN[2:]]


def test_beam_search_with_and_without_cache_agree():
    model = random_model()
    a = generate(model, PROMPTS, 12, method="beam_search", beam_size=3, use_cache=True)
    b = generate(model, PROMPTS, 12, method="beam_search", beam_size=3, use_cache=False)
    assert a == b


class MarkovModel(torch.nn.Module):
    """Next-token log-probabilities that depend on the last token only: a case where greedy search is wrong.

    After the start: A 0.5, B 0.4.  After A: X 0.32, Y 0.3, Z 0.28.  After B: C 0.9.  After C, X, Y or Z:
    <|endoftext|>.  Greedy takes A then X (0.16); the best two-token answer is B C (0.36)."""

    A, B, C, X, Y, Z = 1, 2, 3, 4, 5, 6  # rows of the table: token % 20 (EOT % 20 == 16)

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        table = torch.full((20, VOCAB_SIZE), -30.0)
        table[EOT % 20, [self.A, self.B]] = torch.tensor([0.5, 0.4]).log()
        table[self.A, [self.X, self.Y, self.Z]] = torch.tensor([0.32, 0.3, 0.28]).log()
        table[self.B, self.C] = math.log(0.9)
        for t in (self.C, self.X, self.Y, self.Z):
            table[t, EOT] = 0.0
        self.table = table

    def forward(self, idx, kv_cache=None):
        if kv_cache is not None:
            kv_cache.pos += idx.shape[1]
        return self.table[idx % 20]

    def new_kv_cache(self, batch_size, max_len):
        class Cache:
            pos = 0

            def reorder(self, index):
                pass

        return Cache()


def test_beam_search_finds_the_likelier_sequence_that_greedy_misses():
    m = MarkovModel()
    assert generate(m, [[EOT]], 5) == [[m.A, m.X]]
    assert generate(m, [[EOT]], 5, method="beam_search", beam_size=2) == [[m.B, m.C]]
    assert generate(m, [[EOT]], 5, method="beam_search", beam_size=1) == [[m.A, m.X]]


class EarlyEndModel(MarkovModel):
    """After the start: <|endoftext|> 0.3, A 0.25, B 0.25.  A C C ... each 0.9;  B X 0.9, then <|endoftext|> 1.

    The plain probability prefers the empty answer (0.3 > B X <|endoftext|> 0.225); per token (the
    <|endoftext|> counted), B X <|endoftext|> wins: mean log p -0.50 against -1.20 (empty) and -0.53 (A C C)."""

    def __init__(self):
        super().__init__()
        table = torch.full((20, VOCAB_SIZE), -30.0)
        table[EOT % 20, [EOT, self.A, self.B]] = torch.tensor([0.3, 0.25, 0.25]).log()
        table[self.A, self.C] = table[self.B, self.X] = table[self.C, self.C] = math.log(0.9)
        table[self.X, EOT] = 0.0
        self.table = table


def test_length_penalty_0_favours_ending_early_and_1_ranks_by_mean_log_p():
    m = EarlyEndModel()
    assert generate(m, [[EOT]], 3, method="beam_search", beam_size=3, length_penalty=0) == [[]]
    assert generate(m, [[EOT]], 3, method="beam_search", beam_size=3, length_penalty=1.0) == [[m.B, m.X]]


def test_kv_cache_reads_each_position_once_whatever_the_prompt():
    """The cost per new token: positions fed through the model, counted at the token embedding."""
    model = random_model()
    fed = []
    model.transformer.wte.register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    for prompt_len in (5, 40):
        prompt = [[EOT] + list(range(1, prompt_len))]
        fed.clear()
        generate(model, prompt, 20, use_cache=True, stop_at_eot=False)
        assert fed == [prompt_len] + [1] * 19  # the prompt once, then one position per new token
        fed.clear()
        generate(model, prompt, 20, use_cache=False, stop_at_eot=False)
        assert fed == [prompt_len + k for k in range(20)]  # re-reads everything: grows with the prompt


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model()
    a = generate(model, PROMPTS, 10, method="sampling", seed=7, stop_at_eot=False)
    b = generate(model, PROMPTS, 10, method="sampling", seed=7, stop_at_eot=False)
    c = generate(model, PROMPTS, 10, method="sampling", seed=8, stop_at_eot=False)
    assert a == b and a != c
    greedy = generate(model, PROMPTS, 10, stop_at_eot=False)
    assert generate(model, PROMPTS, 10, method="sampling", top_k=1, stop_at_eot=False) == greedy
    assert generate(model, PROMPTS, 10, method="sampling", top_p=1e-6, stop_at_eot=False) == greedy


def test_top_k_and_top_p_draw_only_from_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    # top_p 0.8: {0.5, 0.25} hold 0.75 < 0.8, so 0.15 joins; 0.06 and 0.04 never come
    draws = sample_next(logits, top_p=0.8, generator=gen)
    assert set(draws.tolist()) == {0, 1, 2}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.9) < 0.05  # renormalised over the kept tokens
    hot = sample_next(logits, temperature=100.0, generator=gen)
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}  # a high temperature flattens the distribution


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        encode_prompt("   ", context=64, n_new=10, number=2)


def test_prompt_longer_than_the_context_keeps_its_last_tokens_with_a_warning():
    text = " ".join(f"word{i}" for i in range(200))
    ids = gpt2_encoding().encode(text)
    with pytest.warns(UserWarning, match="only its last 43 tokens"):
        kept = encode_prompt(text, context=64, n_new=20)
    assert kept == [EOT] + ids[-43:]
    assert len(kept) + 20 == 64  # prompt and new tokens fill the context exactly
    out = generate(random_model(), [kept], 20, stop_at_eot=False)  # and it runs
    assert len(out[0]) == 20


def test_asking_for_more_tokens_than_the_context_is_an_error():
    with pytest.raises(ValueError, match="at most 62"):
        encode_prompt("hello", context=64, n_new=63)
    with pytest.warns(UserWarning, match="only its last 1 tokens"):
        assert encode_prompt("hello world", context=64, n_new=62) == [EOT, gpt2_encoding().encode(" world")[0]]


@pytest.fixture
def ini(tmp_path):
    return write_tiny_ini(tmp_path / "config.ini", tmp_path, inference={"how_many_tokens_to_generate": 8})


def test_cli_prints_a_completion_per_prompt(ini, tmp_path, capsys, pattern_model):
    save_model(tmp_path / "checkpoints" / "final.pt", pattern_model, ARCH)
    enc = gpt2_encoding()
    prompt = enc.decode(PATTERN[:3])
    assert main(["--ini", str(ini), "--prompt", prompt, "--prompt", "Hello", "--method", "beam_search"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "beam_search (beam_size 4)" in out
    assert prompt + enc.decode(PATTERN[3:]) in out  # 7 tokens, then <|endoftext|> stopped it


def test_cli_errors_speak_to_the_user(ini, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "final.pt"
    assert main(["--ini", str(ini), "--model", str(missing), "--prompt", "Hi"]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err

    other = Architecture(N=1, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)
    save_model(tmp_path / "other.pt", GPT(other), other)
    assert main(["--ini", str(ini), "--model", str(tmp_path / "other.pt"), "--prompt", "Hi"]) == 2
    assert "another architecture" in capsys.readouterr().err

    save_model(tmp_path / "final.pt", random_model(), ARCH)
    assert main(["--ini", str(ini), "--model", str(tmp_path / "final.pt"), "--prompt", ""]) == 2
    assert "prompt 1 is empty" in capsys.readouterr().err
    assert main(["--ini", str(ini), "--model", str(tmp_path / "final.pt"), "--prompt", "Hi", "--top-p", "2"]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err
