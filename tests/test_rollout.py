import itertools

import pytest
import torch

from posttrain.models.tiny import build_tiny_model
from posttrain.rollout.engine import HFEngine, KVCacheEngine, SamplingParams, _left_pad, top_p_filter


def _peaked_model(tok, arch, seed=0):
    """A tiny model with large random weights: its greedy output depends on the context (a default
    init repeats one token), so EOS can fall at different steps in different rows."""
    model = build_tiny_model("tiny", tok, arch=arch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _prompts(tok):
    texts = ["12+7=", "3-1=", "45+45-9=", "8=", "70-3+2=", "6+60="]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_greedy(model, tok, prompts, n, max_new, eos):
    ids, attn = _left_pad([p for p in prompts for _ in range(n)], tok.pad_token_id, "cpu")
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in out]


def _eos_with_spread(completions):
    """A token whose first occurrence differs between rows (and is absent from some): used as EOS,
    rows finish at different steps, which exercises the engine's batch compaction."""
    best = None
    for t in set(itertools.chain(*completions)):
        firsts = {c.index(t) if t in c else -1 for c in completions}
        if best is None or len(firsts) > best[0]:
            best = (len(firsts), t)
    return best[1]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_output_equals_transformers_generate(char_tok, arch, decode):
    model = _peaked_model(char_tok, arch)
    prompts = _prompts(char_tok)
    free = _hf_greedy(model, char_tok, prompts, 2, 24, char_tok.eos_token_id)
    eos = _eos_with_spread(free)
    ref = _hf_greedy(model, char_tok, prompts, 2, 24, eos)
    assert len({len(c) for c in ref}) >= 3  # rows end at different steps
    engine = KVCacheEngine(model, char_tok, eos_token_id=eos, decode=decode)
    assert engine.decode == decode
    gen = engine.generate(prompts, 2, SamplingParams(24, temperature=0))
    assert gen.completion_ids == ref
    assert gen.truncated == [eos not in c for c in ref]
    # Small max_batch: several chunks, same result.
    small = KVCacheEngine(model, char_tok, max_batch=3, eos_token_id=eos, decode=decode).generate(
        prompts, 2, SamplingParams(24, temperature=0)
    )
    assert small.completion_ids == ref
    # And the same as the HFEngine the other recipes use.
    assert HFEngine(model, char_tok).generate(prompts, 2, SamplingParams(24, temperature=0)).completion_ids == free


def test_engine_restores_training_mode(char_tok, tiny_model):
    tiny_model.train()
    KVCacheEngine(tiny_model, char_tok).generate(_prompts(char_tok)[:2], 2, SamplingParams(4))
    assert tiny_model.training


def _first_token_probs(model, tok, prompt, temperature, top_p):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    return torch.softmax(top_p_filter((logits / temperature)[None], top_p), -1)[0]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_sampling_draws_from_the_tempered_nucleus(char_tok, temperature, top_p):
    model = _peaked_model(char_tok, "llama", seed=3)
    prompt = _prompts(char_tok)[2]
    probs = _first_token_probs(model, char_tok, prompt, temperature, top_p)
    n = 6000
    torch.manual_seed(0)
    gen = KVCacheEngine(model, char_tok, max_batch=2000).generate(
        [prompt], n, SamplingParams(1, temperature=temperature, top_p=top_p, return_logps=True)
    )
    first = torch.tensor([c[0] for c in gen.completion_ids])
    freq = torch.bincount(first, minlength=len(probs)).float() / n
    assert (freq[probs == 0] == 0).all()  # nothing outside the nucleus
    # Total variation between empirical and exact: ~sqrt(k / n) for k likely tokens.
    assert 0.5 * (freq - probs).abs().sum() < 0.06
    # The reported log-probs are those of the distribution sampled from.
    lp = torch.tensor([x[0] for x in gen.logps])
    assert torch.allclose(lp, probs[first].log(), atol=1e-5)


def test_top_p_filter_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref))
    assert torch.equal(top_p_filter(logits, 1.0), logits)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_samples_of_one_prompt_differ_and_stop_at_eos(char_tok, decode):
    model = _peaked_model(char_tok, "llama", seed=5)
    prompts = _prompts(char_tok)[:3]
    free = KVCacheEngine(model, char_tok).generate(prompts, 4, SamplingParams(16, temperature=0)).completion_ids
    eos = _eos_with_spread(free)
    torch.manual_seed(0)
    gen = KVCacheEngine(model, char_tok, eos_token_id=eos, decode=decode).generate(
        prompts, 4, SamplingParams(16, temperature=1.0)
    )
    assert len(gen.completion_ids) == 12 and gen.prompt_ids == [list(p) for p in prompts]
    for c, trunc in zip(gen.completion_ids, gen.truncated):
        assert eos not in c[:-1]  # nothing after the first EOS
        assert trunc == (c[-1] != eos) and (not trunc or len(c) == 16)
    assert len({tuple(c) for c in gen.completion_ids[:4]}) > 1  # G samples of a prompt are not copies


# --- completion_logps: the GRPO step's log-probs, LM head on completion positions only ---------------


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4096), (0.7, 5)])
def test_completion_logps_match_full_logits_with_gradients(char_tok, temperature, chunk):
    """Against full logits + log-softmax, in float64 so the comparison is exact (a large-weight
    model amplifies float32 round-off in backward); tied embeddings get the head's gradient too."""
    import copy

    from posttrain.data.collate import collate_padded
    from posttrain.data.tokenize import Example
    from posttrain.losses.logprobs import completion_logps, entropy_from_logits, forward_logits

    model = _peaked_model(char_tok, "qwen2", seed=7).double()
    exs = [
        Example(p + c, (0,) * len(p) + (1,) * len(c))
        for p, c in [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([16], [17])]
    ]
    b = collate_padded(exs, char_tok.pad_token_id)
    m = b.target_mask_BT.double()
    a, ref = copy.deepcopy(model), copy.deepcopy(model)
    lp, ent = completion_logps(
        a,
        b.input_ids_BT,
        b.attention_mask,
        b.position_ids_BT,
        b.targets_BT,
        m,
        temperature,
        with_entropy=True,
        chunk_tokens=chunk,
    )
    logits = forward_logits(ref, b.input_ids_BT, b.attention_mask, b.position_ids_BT)
    lp_ref = (logits / temperature).log_softmax(-1).gather(-1, b.targets_BT[..., None])[..., 0]
    assert torch.allclose(lp, lp_ref * m, rtol=0, atol=1e-10)
    ent_ref = (entropy_from_logits(logits.detach(), temperature) * m).sum() / m.sum()
    assert ent == pytest.approx(ent_ref.item(), abs=1e-5)
    w = torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (lp * w * m).sum().backward()
    (lp_ref * w * m).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), ref.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-8, atol=1e-10), n


@pytest.mark.parametrize("decode", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampling_logps_equal_a_teacher_forced_forward(char_tok, arch, decode):
    """Every decode step's distribution is the model's: the log-probs reported while sampling equal
    those of one full forward over prompt + completion (left-padded prompts, rows ending early)."""
    from posttrain.data.collate import collate_padded
    from posttrain.data.tokenize import Example
    from posttrain.losses.logprobs import forward_logits, token_logps

    model = _peaked_model(char_tok, arch, seed=2)
    prompts = _prompts(char_tok)
    eos = _eos_with_spread(
        KVCacheEngine(model, char_tok).generate(prompts, 1, SamplingParams(12, temperature=0)).completion_ids
    )
    torch.manual_seed(1)
    gen = KVCacheEngine(model, char_tok, eos_token_id=eos, decode=decode).generate(
        prompts, 3, SamplingParams(12, temperature=0.8, top_p=1.0, return_logps=True)
    )
    assert len({len(c) for c in gen.completion_ids}) > 1
    seqs = [(p, c) for p in prompts for c in gen.completion_ids[3 * prompts.index(p) : 3 * prompts.index(p) + 3]]
    b = collate_padded([Example(p + c, (0,) * len(p) + (1,) * len(c)) for p, c in seqs], char_tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp = token_logps(forward_logits(model, b.input_ids_BT, b.attention_mask, b.position_ids_BT), b.targets_BT, 0.8)
    for i, (p, c) in enumerate(seqs):
        ref = lp[i, len(p) - 1 : len(p) - 1 + len(c)]
        assert torch.allclose(torch.tensor(gen.logps[i]), ref, atol=1e-4), i


def test_decode_modes_reject_what_they_cannot_run(char_tok, tiny_model):
    with pytest.raises(ValueError, match="cuda_graph.*CUDA"):
        KVCacheEngine(tiny_model, char_tok, decode="cuda_graph")
    with pytest.raises(ValueError, match="decode"):
        KVCacheEngine(tiny_model, char_tok, decode="graph")
    assert KVCacheEngine(tiny_model, char_tok).decode == "dynamic"  # auto on CPU


def test_static_decode_runs_a_lora_wrapped_policy(char_tok):
    """GRPO with LoRA decodes through the peft wrapper: the static loop gives the same greedy output."""
    pytest.importorskip("peft")
    from posttrain.config import LoraConfig
    from posttrain.models.lora import apply_lora

    model = apply_lora(_peaked_model(char_tok, "qwen2", seed=4), LoraConfig(r=4))
    prompts = _prompts(char_tok)
    dyn = KVCacheEngine(model, char_tok, decode="dynamic").generate(prompts, 2, SamplingParams(16, temperature=0))
    sta = KVCacheEngine(model, char_tok, decode="static").generate(prompts, 2, SamplingParams(16, temperature=0))
    assert sta.completion_ids == dyn.completion_ids


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_probability_tokens():
    from posttrain.rollout.engine import inverse_cdf

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3]]).expand(40000, 4)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(inverse_cdf(probs, u), minlength=4).float() / 40000
    assert counts[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(counts, torch.tensor([0.5, 0.0, 0.2, 0.3]), atol=0.01)
    # the interval boundaries: u just below 0.5 is token 0, from 0.5 on token 2, from 0.7 on token 3
    edges = inverse_cdf(torch.tensor([[0.5, 0.0, 0.2, 0.3]] * 4), torch.tensor([0.0, 0.4999, 0.5, 0.9999]))
    assert edges.tolist() == [0, 0, 2, 3]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_seeded_rows_sample_the_same_in_any_batch(char_tok, decode):
    """Row r's completion depends on seeds[r] alone: the same rows generated in one call, in two calls
    (two data-parallel ranks) or in small chunks are identical; other seeds give other samples."""
    from posttrain.rollout.engine import row_seeds

    model = _peaked_model(char_tok, "llama")
    prompts = _prompts(char_tok)[:4]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, return_logps=True)
    seeds = row_seeds((0, 1, 1), range(len(prompts) * 3))
    probe = KVCacheEngine(model, char_tok, decode=decode).generate(prompts, 3, params, seeds=seeds)
    eos = _eos_with_spread(probe.completion_ids)  # rows end at different steps: the batch compacts

    def gen(ps, sd, **kw):
        return KVCacheEngine(model, char_tok, decode=decode, eos_token_id=eos, **kw).generate(ps, 3, params, seeds=sd)

    whole = gen(prompts, seeds)
    assert len({len(c) for c in whole.completion_ids}) >= 3
    first, second = gen(prompts[:2], seeds[:6]), gen(prompts[2:], seeds[6:])
    chunked = gen(prompts, seeds, max_batch=3)
    assert first.completion_ids + second.completion_ids == whole.completion_ids == chunked.completion_ids
    for a, b in zip(first.logps + second.logps, whole.logps):
        assert a == pytest.approx(b, abs=1e-5)
    other = gen(prompts, row_seeds((0, 1, 2), range(12)))
    assert other.completion_ids != whole.completion_ids
    assert len(set(map(tuple, whole.completion_ids))) > 4  # the samples of one prompt still differ
