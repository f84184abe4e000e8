"""The prompt/response boundary on real tokenizers, and the one scoring function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bso_cache.data.formats import Pair
from bso_cache.scoring.layouts import make_token_batch
from bso_cache.scoring.head import TargetLogProbs
from bso_cache.scoring.scorer import sequence_logps
from bso_cache.data.tokenize import PairTokenizer, apply_length_policy, PairTokens

PAIR = Pair(0, (("user", "How do I bake bread?"), ("assistant", "With flour."), ("user", "And then?")),
            "Knead the dough, let it rise, and bake it for 30 minutes.", "No idea.")


def check_boundary(tok, ptok: PairTokenizer, pair: Pair = PAIR):
    prompt_text, chosen_text, rejected_text = ptok.render(pair)
    enc = ptok.encode_many([pair])[0]
    # the response ids decode to the response (plus end-of-turn), the prompt ids to the prompt
    assert pair.chosen in tok.decode(enc.chosen_ids)
    assert pair.rejected in tok.decode(enc.rejected_ids)
    assert "And then?" in tok.decode(enc.prompt_ids)
    assert pair.chosen not in tok.decode(enc.prompt_ids)
    # every token of the prompt and of the response is what the separate encodings gave: no merges
    # across the boundary, and the concatenation decodes to the whole conversation
    assert enc.prompt_ids.dtype == np.int32  # compact arrays, not lists of Python ints
    assert enc.prompt_ids.tolist() == tok(prompt_text, add_special_tokens=not ptok.use_chat)["input_ids"]
    full = tok.decode(np.concatenate([enc.prompt_ids, enc.chosen_ids]).tolist(), skip_special_tokens=False)
    assert full.replace(" ", "").endswith(tok.decode(enc.chosen_ids).replace(" ", ""))
    return enc


def test_boundary_tinystories_plain(tinystories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tinystories))
    ptok = PairTokenizer(tok)
    assert ptok.mode == "plain"
    enc = check_boundary(tok, ptok)
    assert enc.prompt_ids[0] == tok.bos_token_id and enc.chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.prompt_ids, skip_special_tokens=True).endswith("Human: And then?\n\nAssistant:")


def test_boundary_gpt2_plain(gpt2_tokenizer):
    ptok = PairTokenizer(gpt2_tokenizer)
    enc = check_boundary(gpt2_tokenizer, ptok)
    assert enc.chosen_ids[-1] == gpt2_tokenizer.eos_token_id == 50256
    # plain text round trip: prompt + " " + response
    text = gpt2_tokenizer.decode(np.concatenate([enc.prompt_ids, enc.chosen_ids[:-1]]).tolist())
    assert text.endswith("Assistant: " + PAIR.chosen)


def test_boundary_chatml(chatml_tokenizer):
    tok = chatml_tokenizer
    ptok = PairTokenizer(tok)
    assert ptok.mode == "chat"
    enc = check_boundary(tok, ptok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in enc.chosen_ids  # the response includes its end-of-turn token
    prompt = tok.decode(enc.prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.chosen_ids) == PAIR.chosen + "<|im_end|>\n"


def test_boundary_smollm2_real_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ptok = PairTokenizer(tok)
    assert ptok.mode == "chat"
    enc = check_boundary(tok, ptok)
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.chosen_ids).startswith(PAIR.chosen + "<|im_end|>")


def test_template_override_and_plain_forcing(chatml_tokenizer):
    assert PairTokenizer(chatml_tokenizer, template="plain").mode == "plain"
    enc = PairTokenizer(chatml_tokenizer, template="plain").encode_many([PAIR])[0]
    assert "<|im_start|>" not in chatml_tokenizer.decode(enc.prompt_ids)


def test_length_policy():
    enc = PairTokens(*(np.array(x, dtype=np.int32) for x in ([1, 2, 3], [4, 5, 6, 7], [8, 9])))
    assert apply_length_policy(enc, 7, "drop") == (enc, None)
    assert apply_length_policy(enc, 6, "drop") == (None, "overlong")
    cut, reason = apply_length_policy(enc, 5, "truncate")
    assert reason is None and cut.chosen_ids.tolist() == [4, 5] and cut.rejected_ids.tolist() == [8, 9] and cut.truncated
    assert apply_length_policy(enc, 3, "truncate") == (None, "prompt_too_long")


def naive_logps(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    return (lp * batch.score_mask[:, 1:]).sum(1)


def test_sequence_logps_matches_full_logits_values_and_gradients(demo_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]))
    batch = make_token_batch([[1, 5, 6], [1, 7], [1, 9, 9, 9, 9]], [[8, 9, 10], [11, 12, 13, 14], [20]], pad_id=3)
    for chunk in (1, 3, 1000):
        model.zero_grad()
        ours = sequence_logps(model, batch, chunk=chunk)
        ours.sum().backward()
        g_ours = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = naive_logps(model, batch)
        ref.sum().backward()
        g_ref = [p.grad.clone() for p in model.parameters()]
        assert ours.dtype == torch.float64  # float32 per token, summed in float64
        assert torch.allclose(ours, ref.double(), atol=1e-4)
        for a, b in zip(g_ours, g_ref):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_target_logprobs_gradcheck_float64():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))

    for chunk in (1, 3, 100):
        for store in (0, 1 << 20):  # the backward recomputes the logits / reads the stored softmax
            # (stored: gradcheck's first backward reads it, later ones recompute it: equal to rounding)
            assert torch.autograd.gradcheck(lambda a, c, d: TargetLogProbs.apply(a, c, d, t, chunk, store), (h, w, b),
                                            nondet_tol=1e-12 if store else 0.0)
    naive = torch.log_softmax(h @ w.t() + b, -1).gather(1, t[:, None]).squeeze(1)
    assert torch.allclose(TargetLogProbs.apply(h, w, b, t, 2), naive, atol=1e-12)
    out32 = TargetLogProbs.apply(h.float(), w.float(), b.float(), t, 2)
    assert out32.dtype == torch.float32 and torch.allclose(out32.double(), naive, atol=1e-5)


def test_stored_softmax_backward_equals_recompute_and_a_second_backward():
    torch.manual_seed(0)
    h = torch.randn(9, 6, requires_grad=True)
    w = torch.randn(13, 6, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    g = torch.randn(9)
    grads = []
    for store in (0, 9 * 13 * 4, 9 * 13 * 4 - 1):  # recompute, stored (exactly fits), over budget: recompute
        h.grad = w.grad = None
        out = TargetLogProbs.apply(h, w, None, t, 4, store)
        assert (out.grad_fn.probs is not None) == (store == 9 * 13 * 4)  # the softmax kept only where it fits
        (out * g).sum().backward()
        grads.append((out.detach(), h.grad.clone(), w.grad.clone()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # float64: the stored path's gradient is autograd's own through a full log_softmax
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    naive = torch.log_softmax(h64 @ w64.t(), -1).gather(1, t[:, None]).squeeze(1)
    expect = torch.autograd.grad((naive * g.double()).sum(), (h64, w64))
    out = TargetLogProbs.apply(h64, w64, None, t, 4, 1 << 20)
    first = torch.autograd.grad((out * g.double()).sum(), (h64, w64), retain_graph=True)
    second = torch.autograd.grad((out * g.double()).sum(), (h64, w64))  # the softmax was used up: recomputed
    for got in (first, second):
        for a, b in zip(got, expect):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_head_gradient_without_a_float32_buffer_equals_the_accumulated_one(monkeypatch):
    """A bf16 head with the softmax kept writes its weight gradient block by block in bf16: the same
    numbers as the float32 accumulator rounded to bf16 (within one bf16 rounding)."""
    import bso_cache.scoring.head as head

    monkeypatch.setattr(head, "GRAD_BLOCK_BYTES", 4 * 32 * 1000)  # blocks of 1,000 vocabulary rows: 3 of them
    torch.manual_seed(0)
    h = torch.randn(40, 32, dtype=torch.bfloat16)
    w = (torch.randn(3000, 32) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, 3000, (40,))
    g = torch.randn(40)
    got = []
    for store in (1 << 20, 0):  # kept softmax (direct bf16 blocks), recompute (float32 accumulator)
        w_ = w.clone().requires_grad_(True)
        (TargetLogProbs.apply(h, w_, None, t, 64, store) * g).sum().backward()
        got.append(w_.grad)
    assert got[0].dtype == torch.bfloat16
    diff = (got[0].float() - got[1].float()).abs()
    assert (diff <= 2 ** -7 * got[1].float().abs() + 1e-6).all()


def test_bf16_head_recomputing_its_softmax_holds_no_float32_weight_sized_buffer():
    """A bf16 head whose softmax is not kept (large N x V) computes its gradients by blocks of
    vocabulary rows: no (V, H) float32 tensor at any point (by chunks of positions it summed into
    one: 2.2 GB at a 152k vocabulary and H = 3584); the weight and bias gradients equal the
    kept-softmax path's within a bf16 rounding, the hidden gradient is within 2.5x bf16's rounding
    of float64."""
    from .conftest import largest_float32_made

    torch.manual_seed(0)
    n, vocab, hid = 48, 3000, 32
    h = torch.randn(n, hid).to(torch.bfloat16)
    w = (torch.randn(vocab, hid) * 0.1).to(torch.bfloat16)
    b = (torch.randn(vocab) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,))
    g = torch.randn(n)
    hx, wx, bx = (x.clone().requires_grad_(True) for x in (h, w, b))
    out = TargetLogProbs.apply(hx, wx, bx, t, 8, 0)  # chunks of 8 positions: blocks of 500 rows
    with largest_float32_made() as seen:
        (out * g).sum().backward()
    assert seen.largest < vocab * hid / 2, seen.largest
    assert (hx.grad.dtype, wx.grad.dtype, bx.grad.dtype) == (torch.bfloat16,) * 3
    # the kept-softmax path (the same bf16 logits, the gradient in one pass) within a bf16 rounding
    hs, ws, bs = (x.clone().requires_grad_(True) for x in (h, w, b))
    (TargetLogProbs.apply(hs, ws, bs, t, 8, 1 << 30) * g).sum().backward()
    for got, want in ((wx.grad, ws.grad), (bx.grad, bs.grad)):
        assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-6).all()
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (h, w, b))
    (torch.log_softmax(h64 @ w64.t() + b64, -1).gather(1, t[:, None]).squeeze(1) * g.double()).sum().backward()
    floor = float((h64.grad.to(torch.bfloat16).double() - h64.grad).norm() / h64.grad.norm())
    assert float((hx.grad.double() - h64.grad).norm() / h64.grad.norm()) < 2.5 * floor


@pytest.mark.parametrize("store", [1 << 30, 0])
def test_float32_head_under_autocast_runs_its_matmuls_as_autocast_does(store):
    """Float32 weights under bf16 autocast: values and gradients equal autocast's own linear layer
    followed by a float32 log-softmax (the float32 matmuls the head ran before cost ~90 ms of a
    235 ms step on an H200); the stored and the recomputing backward agree."""
    torch.manual_seed(0)
    h = torch.randn(24, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.2).requires_grad_(True)
    t = torch.randint(0, 500, (24,))
    g = torch.randn(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(h, w)
    assert logits.dtype == torch.bfloat16
    expect = torch.log_softmax(logits.float(), -1).gather(1, t[:, None]).squeeze(1)
    (expect * g).sum().backward()
    expect_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TargetLogProbs.apply(h, w, None, t, 8, store, torch.bfloat16)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expect, atol=1e-5)
    (got * g).sum().backward()
    for a, b in zip((h.grad, w.grad), expect_grads):
        assert a.dtype == torch.float32
        assert float((a - b).norm() / b.norm()) < 1e-2  # bf16 matmuls, summed per chunk or at once


def test_scorer_under_autocast_equals_the_models_own_autocast_logits(demo_assets):
    """The scorer hands autocast's dtype to the head: its sums equal the model's full-logit forward
    under autocast, with gradients (the head keeps the softmax) as without."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"])).eval()
    tb = make_token_batch([[1, 5, 6, 7], [1, 8]], [[14, 15, 30, 31], [16, 17, 18, 19, 20, 21, 22]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
    expect = (lp * tb.score_mask[:, 1:]).sum(1).double()
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            got = sequence_logps(model, tb).detach()
        assert torch.allclose(got, expect, atol=1e-4), (grad, (got - expect).abs().max())


def test_padding_and_batch_do_not_change_scores(demo_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"])).eval()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]]
    responses = [[14, 15], [16, 17, 18, 19, 20, 21, 22], [23]]
    with torch.no_grad():
        together = sequence_logps(model, make_token_batch(prompts, responses))
        alone = torch.cat([sequence_logps(model, make_token_batch([p], [r])) for p, r in zip(prompts, responses)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_make_token_batch_rejects_empty_prompt():
    from bso_cache.errors import DataError

    with pytest.raises(DataError, match="at least one token"):
        make_token_batch([[]], [[1, 2]])
