"""The GPT-2 model (model/gpt.py) and model files (model/checkpoint.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import ModelFileError, load_model, save_model
from model.gpt import GPT, PADDED_VOCAB_SIZE, CausalAttentionCPU
from pipeline.config import VOCAB_SIZE, Architecture

TINY = Architecture(N=2, d_model=32, d_ff=64, h=4, d_k=8, d_v=8, positional_encoding_max_pos=48)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(TINY, **kw).eval()


def test_parameter_names_and_shapes_are_openai_gpt2s():
    sd = GPT(Architecture(N=1, d_model=64, d_ff=256, h=2, d_k=32, d_v=32, positional_encoding_max_pos=1024)).state_dict()
    # Hugging Face GPT2LMHeadModel's names; Linear weights are OpenAI's Conv1D weights transposed.
    expected = {
        "transformer.wte.weight": (PADDED_VOCAB_SIZE, 64), "transformer.wpe.weight": (1024, 64),
        "transformer.h.0.ln_1.weight": (64,), "transformer.h.0.ln_1.bias": (64,),
        "transformer.h.0.attn.c_attn.weight": (192, 64), "transformer.h.0.attn.c_attn.bias": (192,),
        "transformer.h.0.attn.c_proj.weight": (64, 64), "transformer.h.0.attn.c_proj.bias": (64,),
        "transformer.h.0.ln_2.weight": (64,), "transformer.h.0.ln_2.bias": (64,),
        "transformer.h.0.mlp.c_fc.weight": (256, 64), "transformer.h.0.mlp.c_fc.bias": (256,),
        "transformer.h.0.mlp.c_proj.weight": (64, 256), "transformer.h.0.mlp.c_proj.bias": (64,),
        "transformer.ln_f.weight": (64,), "transformer.ln_f.bias": (64,), "lm_head.weight": (PADDED_VOCAB_SIZE, 64),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert PADDED_VOCAB_SIZE % 64 == 0 and 0 <= PADDED_VOCAB_SIZE - VOCAB_SIZE < 64


def test_gpt2_small_has_gpt2_smalls_parameter_count():
    with torch.device("meta"):
        m = GPT(Architecture(positional_encoding_max_pos=1024))
    # 124,439,808 in OpenAI's GPT-2 small (vocabulary 50,257, 1,024 positions); ours adds 47 zero rows of wte.
    assert m.num_params() == 124_439_808 + (PADDED_VOCAB_SIZE - VOCAB_SIZE) * 768


def test_output_projection_is_tied_to_the_token_embedding():
    m = tiny_model()
    assert m.lm_head.weight is m.transformer.wte.weight


def test_initialisation_scales_residual_projections_and_zeroes_padding():
    torch.manual_seed(0)
    arch = Architecture(N=8, d_model=256, d_ff=1024, h=4, d_k=64, d_v=64, positional_encoding_max_pos=64)
    m = GPT(arch, init_std=0.05)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert m.transformer.h[3].mlp.c_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(16), rel=0.02)
    assert m.transformer.h[3].attn.c_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(16), rel=0.05)
    assert m.transformer.wte.weight[:VOCAB_SIZE].std().item() == pytest.approx(0.05, rel=0.02)
    assert m.transformer.wte.weight[VOCAB_SIZE:].abs().max().item() == 0
    assert m.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_scale_residual_init_false_is_the_originals_plain_init():
    torch.manual_seed(0)
    arch = Architecture(N=8, d_model=256, d_ff=1024, h=4, d_k=64, d_v=64, positional_encoding_max_pos=64)
    m = GPT(arch, init_std=0.05, scale_residual_init=False)
    for w in (m.transformer.h[3].mlp.c_proj.weight, m.transformer.h[3].attn.c_proj.weight):
        assert w.std().item() == pytest.approx(0.05, rel=0.05)
    assert (m.transformer.ln_f.weight == 1).all()


def test_logits_are_gpt2s_vocabulary_and_causal():
    m = tiny_model()
    idx = torch.randint(0, VOCAB_SIZE, (2, 12))
    with torch.no_grad():
        a = m(idx)
        idx2 = idx.clone()
        idx2[:, 7:] = (idx2[:, 7:] + 1) % VOCAB_SIZE
        b = m(idx2)
    assert a.shape == (2, 12, VOCAB_SIZE)
    assert torch.equal(a[:, :7], b[:, :7])        # a later token never changes an earlier prediction
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("T", [1, 64, 130])  # one query, one whole block, two blocks and a 2-query block
def test_blocked_cpu_attention_equals_sdpa_values_and_gradients(T):
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, T, 8, dtype=torch.float64) for _ in range(3)]
    g = torch.randn(2, 3, T, 8, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ours = [t.to(dtype).detach().requires_grad_() for t in inputs]
        theirs = [t.detach().clone().requires_grad_() for t in inputs]
        given = [t.detach().clone() for t in ours]
        out = CausalAttentionCPU.apply(*ours)
        assert all(torch.equal(mine, t) for mine, t in zip(ours, given))  # inputs left as they were
        ref = F.scaled_dot_product_attention(*theirs, is_causal=True)
        out.backward(g.to(dtype))
        ref.backward(g)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        for mine, exact in zip(ours, theirs):
            torch.testing.assert_close(mine.grad.double(), exact.grad, atol=10 * tol, rtol=10 * tol)


def test_blocked_cpu_attention_in_bfloat16_is_within_bfloat16_round_off():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 130, 16, dtype=torch.float64) * 1.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours = CausalAttentionCPU.apply(*(t.bfloat16() for t in (q, k, v))).double()
    assert ours.dtype == torch.float64 and (ours - exact).norm() / exact.norm() < 2e-2


def test_training_forward_takes_the_blocked_attention_on_a_cpu(monkeypatch):
    model = tiny_model()
    idx = torch.randint(0, VOCAB_SIZE, (2, 40))
    calls = []
    monkeypatch.setattr(CausalAttentionCPU, "apply", lambda *a: calls.append(1) or F.scaled_dot_product_attention(
        *a, is_causal=True))
    model.hidden_states(idx)
    assert len(calls) == TINY.N


def test_kv_cache_gives_the_full_forwards_logits_and_reorders_rows():
    m = tiny_model()
    idx = torch.randint(0, VOCAB_SIZE, (3, 20))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_kv_cache(batch_size=3, max_len=32)
        parts = [m(idx[:, :6], cache), m(idx[:, 6:11], cache)] + [m(idx[:, t:t + 1], cache) for t in range(11, 20)]
        assert cache.pos == 20
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)

        # beam search: keep rows 2, 2, 0 and carry on; the result is the full forward of those rows
        cache = m.new_kv_cache(batch_size=3, max_len=32)
        m(idx[:, :10], cache)
        cache.reorder(torch.tensor([2, 2, 0]))
        nxt = torch.randint(0, VOCAB_SIZE, (3, 1))
        step = m(nxt, cache)
        ref = m(torch.cat([idx[[2, 2, 0], :10], nxt], 1))[:, -1:]
        torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_mode_only():
    m = tiny_model(P_drop=0.5)
    idx = torch.randint(0, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        assert torch.equal(m(idx), m(idx))
        m.train()
        assert not torch.equal(m(idx), m(idx))


@pytest.mark.parametrize("attention_dropout", [False, True])
def test_attention_weights_are_dropped_only_with_attention_dropout(attention_dropout):
    torch.manual_seed(0)
    attn = GPT(TINY, P_drop=0.5, attention_dropout=attention_dropout).transformer.h[0].attn.train()
    attn.resid_dropout = torch.nn.Identity()  # leave only the dropout inside attention
    x = torch.randn(2, 10, TINY.d_model)
    with torch.no_grad():
        same = torch.equal(attn(x), attn(x))
    assert same != attention_dropout


def test_too_many_positions_is_an_error():
    m = tiny_model()
    with pytest.raises(ValueError, match="positional_encoding_max_pos"):
        m(torch.zeros(1, TINY.positional_encoding_max_pos + 1, dtype=torch.long))


# --- model files ----------------------------------------------------------------------------------------

def test_save_and_load_model_round_trip(tmp_path):
    m = tiny_model()
    save_model(tmp_path / "final.pt", m, TINY, run_dir="run-abc", step=7)
    m2, arch, meta = load_model(tmp_path / "final.pt", expected_arch=TINY)
    assert arch == TINY and meta["run_dir"] == "run-abc" and meta["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert not [p for p in tmp_path.iterdir() if p.name != "final.pt"]  # no temporary file left


def test_missing_model_file_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"nothere\.pt: no such file"):
        load_model(tmp_path / "nothere.pt")


def test_truncated_model_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "final.pt"
    save_model(path, tiny_model(), TINY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"final\.pt: cannot be read.*truncated or corrupt"):
        load_model(path)


def test_a_file_that_is_not_a_model_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError, match=r"other\.pt: not a model file"):
        load_model(path)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelFileError, match=r"text\.pt"):
        load_model(tmp_path / "text.pt")


def test_another_architecture_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "final.pt"
    save_model(path, tiny_model(), TINY)
    other = Architecture(N=3, d_model=32, d_ff=64, h=4, d_k=8, d_v=8, positional_encoding_max_pos=48)
    with pytest.raises(ModelFileError, match=r"final\.pt: .*another architecture.*N = 2 in the file but 3"):
        load_model(path, expected_arch=other)
