"""Token log-probabilities and entropy from logits, and the one forward pass every recipe uses.

``logits[:, t]`` predicts token ``t + 1``; callers pass ``targets_BT`` already shifted
(see posttrain.data.collate). With sampling temperature T != 1 the logits are divided by T before
the log-softmax, so the trainer scores tokens under the distribution the sampler used.
"""

from __future__ import annotations

import torch


def token_logps(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target], computed row by row to bound the (B, T, V) float32 copies."""
    out = []
    for logits_TV, tgt_T in zip(logits_BTV, targets_BT):
        logits_TV = logits_TV.float()
        if temperature != 1.0:
            logits_TV = logits_TV / temperature
        picked = logits_TV.gather(-1, tgt_T.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(logits_TV, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position (B, T)."""
    out = []
    for logits_TV in logits_BTV:
        z = logits_TV.float() / temperature
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.stack(out)


def forward_logits(model, input_ids_BT, attention_mask, position_ids_BT=None) -> torch.Tensor:
    return model(
        input_ids=input_ids_BT, attention_mask=attention_mask, position_ids=position_ids_BT, use_cache=False
    ).logits


def _output_head(model):
    """(backbone, lm_head) of a plain causal LM whose logits are exactly ``lm_head(last_hidden_state)``,
    or None (logit soft-capping or scaling, or no separable backbone): callers then use full logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if head is None or backbone is None or backbone is lm or getattr(head, "bias", None) is not None:
        return None
    return backbone, head


class _HeadLogps(torch.autograd.Function):
    """log softmax(h W^T / T)[target] for N selected positions, ``chunk`` rows at a time.

    Forward keeps only (N,) log-sum-exps (and gives the entropy of each position, without gradient,
    from the same logits); backward recomputes each chunk's logits, so the (N, V) logits never exist
    whole (and never for prompt or padding positions). Gradient of
    logp = z_y - logsumexp(z), z = hW^T / T:  d/dz = onehot(y) - softmax(z), times 1/T.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk, with_entropy):
        acc = torch.promote_types(hidden_NH.dtype, torch.float32)  # bf16 models: softmax in float32
        logps = torch.empty(hidden_NH.shape[0], dtype=acc, device=hidden_NH.device)
        lse = torch.empty_like(logps)
        ent = torch.zeros_like(logps)
        for s in range(0, hidden_NH.shape[0], chunk):
            z = (hidden_NH[s : s + chunk] @ weight_VH.t()).to(acc) / temperature
            lse[s : s + chunk] = torch.logsumexp(z, -1)
            logps[s : s + chunk] = z.gather(-1, targets_N[s : s + chunk, None])[:, 0] - lse[s : s + chunk]
            if with_entropy:  # H = logsumexp(z) - sum softmax(z) z, from the same chunk of logits
                ent[s : s + chunk] = lse[s : s + chunk] - (torch.exp(z - lse[s : s + chunk, None]) * z).sum(-1)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, grad_N, _grad_ent):
        hidden_NH, weight_VH, targets_N, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight_VH.shape, dtype=lse.dtype, device=weight_VH.device) if ctx.needs_input_grad[1] else None
        )
        for s in range(0, hidden_NH.shape[0], chunk):
            h = hidden_NH[s : s + chunk]
            z = (h @ weight_VH.t()).to(lse.dtype) / T
            g = -torch.exp(z - lse[s : s + chunk, None]) * grad_N[s : s + chunk, None]
            g.scatter_add_(-1, targets_N[s : s + chunk, None], grad_N[s : s + chunk, None])
            g = (g / T).to(weight_VH.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ weight_VH
            if grad_w is not None:
                grad_w += (g.t() @ h).to(grad_w.dtype)
        return grad_h, None if grad_w is None else grad_w.to(weight_VH.dtype), None, None, None, None


# The attribute under which a model wrapped for data parallelism carries its FSDP entry point for
# ``completion_logps_unwrapped`` (``run.loop.wrap`` registers it).
COMPLETION_LOGPS_ENTRY = "_posttrain_completion_logps"


def completion_logps(
    model,
    input_ids_BT,
    attention_mask,
    position_ids_BT,
    targets_BT,
    target_mask_BT,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
):
    """See ``completion_logps_unwrapped``. A model wrapped for data parallelism runs it through the entry
    point ``run.loop.wrap`` registered with FSDP, which gathers the parameters the backbone and
    the head use outside ``forward``."""
    entry = getattr(model, COMPLETION_LOGPS_ENTRY, None)
    fn = entry if entry is not None else (lambda *a, **k: completion_logps_unwrapped(model, *a, **k))
    return fn(
        input_ids_BT,
        attention_mask,
        position_ids_BT,
        targets_BT,
        target_mask_BT,
        temperature,
        with_entropy,
        chunk_tokens,
    )


def completion_logps_unwrapped(
    model,
    input_ids_BT,
    attention_mask,
    position_ids_BT,
    targets_BT,
    target_mask_BT,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
):
    """(logps_BT, mean entropy or None): ``token_logps`` of the policy over ``targets_BT``, computed for
    the positions where ``target_mask_BT`` > 0 only (0 elsewhere).

    The LM head runs on those positions only, in chunks, with the logits recomputed in backward
    (``_HeadLogps``): peak memory holds no (B, T, V) logits, which dominate at a 150k vocabulary. Models
    whose logits are not a plain head over the last hidden state fall back to ``forward_logits``.
    The entropy is the masked mean over the same positions, without gradient. ``chunk_tokens`` (default:
    a 16 MiB float32 logits tile on CPU, where cache-sized tiles run fastest, 1 GiB on GPU) bounds the
    (chunk, V) logits alive at once.
    """
    split = _output_head(model)
    if split is None:
        logits = forward_logits(model, input_ids_BT, attention_mask, position_ids_BT)
        logps = token_logps(logits, targets_BT, temperature)
        ent = None
        if with_entropy:
            with torch.no_grad():
                e = entropy_from_logits(logits.detach(), temperature)
                ent = ((e * target_mask_BT).sum() / target_mask_BT.sum().clamp(min=1)).item()
        return logps, ent
    backbone, head = split
    hidden_BTH = backbone(
        input_ids=input_ids_BT, attention_mask=attention_mask, position_ids=position_ids_BT, use_cache=False
    ).last_hidden_state
    if chunk_tokens is None:
        budget = 1 << (28 if head.weight.is_cuda else 22)  # logits elements per tile
        chunk_tokens = max(1, budget // head.weight.shape[0])
    sel_BT = target_mask_BT > 0
    hidden_NH, targets_N = hidden_BTH[sel_BT], targets_BT[sel_BT]
    logps_N, ent_N = _HeadLogps.apply(hidden_NH, head.weight, targets_N, float(temperature), chunk_tokens, with_entropy)
    # masked_scatter keeps an all-masked batch connected to the graph (a zero with a gradient path).
    logps_BT = torch.zeros(sel_BT.shape, dtype=logps_N.dtype, device=logps_N.device).masked_scatter(sel_BT, logps_N)
    ent = ent_N.sum().item() / max(1, ent_N.shape[0]) if with_entropy else None
    return logps_BT, ent
