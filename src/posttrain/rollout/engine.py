"""Rollout engines: prompts in, token ids (and optionally sampling log-probs) out.

The interface is one method, ``generate(prompt_ids, n, params) -> Generation``. Both engines run
on the policy itself (no weight copy, so no sync step), batched with left padding and a KV cache:
``KVCacheEngine`` is a lean sampling loop that prefills each distinct prompt once and drops finished
rows from the batch, or replays a CUDA graph per token on a GPU (what GRPO, evaluation and make-pairs
use); ``HFEngine`` calls transformers' ``generate``, the reference and the fallback for models the
lean loop does not cover.
Completions are returned unpadded: everything after the first EOS is cut, and EOS itself is kept
(it is a token the policy chose, so it carries loss).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    return_logps: bool = False
    # Tokens that end a completion besides the engine's EOS (kept, like EOS): a chat turn's end-of-turn token.
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """Completions for P prompts x n samples, in prompt-major order (prompt i's samples are contiguous)."""

    prompt_ids: list[list[int]]  # P prompts
    completion_ids: list[list[int]]  # P * n completions, EOS kept, nothing after it
    truncated: list[bool]  # hit max_new_tokens without EOS (or a stop id)
    logps: list[list[float]] | None  # sampling log-probs per completion token, when asked for

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutEngine(Protocol):
    """Recipes call ``sleep`` before an update and ``sync_weights`` after it; an engine that holds its
    own copy of the weights (vLLM) releases memory and reloads the policy there, the engines that run
    on the policy itself do nothing. ``close`` frees the engine."""

    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Generation: ...

    def sync_weights(self) -> None: ...

    def sleep(self) -> None: ...

    def close(self) -> None: ...


class _OnPolicyWeights:
    """The engine generates with the policy module itself: nothing to push, release or free."""

    def sync_weights(self) -> None:
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, T - len(s) :] = 1
    return ids.to(device), attn.to(device)


class HFEngine(_OnPolicyWeights):
    """transformers ``generate`` on the policy (no copy of the weights, so no sync step)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 256):
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Generation:
        if seeds is not None:
            raise ValueError("HFEngine samples with transformers' own RNG: per-row seeds need KVCacheEngine")
        seqs = [p for p in prompt_ids for _ in range(n)]
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        stops = [eos, *params.stop_ids]
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logps: list[list[float]] | None = [] if params.return_logps else None
        try:
            for s in range(0, len(seqs), self.max_batch):
                chunk = seqs[s : s + self.max_batch]
                ids, attn = _left_pad(chunk, pad, next(self.model.parameters()).device)
                greedy = params.temperature <= 0
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=attn,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p,
                    top_k=None if greedy else 0,
                    eos_token_id=stops,
                    pad_token_id=pad,
                    use_cache=True,
                    return_dict_in_generate=True,
                    output_scores=params.return_logps,
                )
                new = out.sequences[:, ids.shape[1] :].tolist()
                if params.return_logps:
                    # scores are the processed logits the sampler drew from (temperature, top-p applied)
                    step_logps = torch.stack(out.scores, 1).float().log_softmax(-1)  # (B, T_new, V)
                for b, toks in enumerate(new):
                    ends = [i for i, t in enumerate(toks) if t in stops]
                    cut = ends[0] + 1 if ends else len(toks)
                    completions.append(toks[:cut])
                    truncated.append(not ends)
                    if logps is not None:
                        idx = torch.tensor(toks[:cut], device=step_logps.device)
                        logps.append(step_logps[b, torch.arange(cut, device=idx.device), idx].tolist())
        finally:
            self.model.train(was_training)
        return Generation([list(p) for p in prompt_ids], completions, truncated, logps)


def top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the most likely tokens until their mass reaches
    ``top_p``, the most likely one always; the rest get -inf. A token is dropped when the tokens ranked
    strictly above it already hold >= top_p of the mass (the rule transformers' TopPLogitsWarper uses)."""
    if top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(-1, descending=True)
    probs_BV = sorted_BV.softmax(-1)
    mass_above_BV = probs_BV.cumsum(-1) - probs_BV
    drop_BV = mass_above_BV >= top_p
    drop_BV[:, 0] = False
    return logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))


def row_seeds(base: Sequence[int], rows: range) -> list[int]:
    """Seeds of the output rows ``rows`` of one generation call identified by ``base`` (e.g. (seed, step,
    round)): a hash of both, so every row has its own stream and no two calls share one."""
    return [
        int.from_bytes(hashlib.blake2b(repr((tuple(base), r)).encode(), digest_size=8).digest(), "big") >> 1
        for r in rows
    ]


def uniform_noise(rows: int, steps: int, seeds: Sequence[int] | None) -> torch.Tensor:
    """(rows, steps) uniforms in [0, 1): one per row and decoding step, drawn on the CPU (the same numbers
    on any device). Row r from its own generator seeded ``seeds[r]``, or all rows from the global RNG."""
    if seeds is None:
        return torch.rand((rows, steps))
    return (
        torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        if rows
        else torch.zeros((0, steps))
    )


def inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative-probability interval holds u * total: a draw from ``probs_BV`` per row
    (the same distribution as ``torch.multinomial``, but a function of the row's own uniform, so a row
    samples the same token in any batch). Zero-probability tokens (top-p's cut) have empty intervals
    and are never chosen."""
    cdf_BV = probs_BV.cumsum(-1)
    x_B1 = u_B.to(cdf_BV)[:, None] * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, x_B1, right=True)[:, 0].clamp(max=probs_BV.shape[-1] - 1)


class KVCacheEngine(_OnPolicyWeights):
    """A lean sampling loop with a KV cache over the policy: one forward per new token, nothing else.

    Against ``model.generate`` it saves: (1) the prefill of repeated prompts -- each distinct prompt is
    prefilled once and its cache copied to its n samples (GRPO's G samples share a prompt); (2) compute
    on finished rows -- rows that emitted EOS leave the batch (the cache is compacted once at least an
    eighth of the rows are done); (3) the per-token logits-processor / stopping-criteria machinery.
    Sampling: logits / temperature, nucleus filter, one inverse-CDF draw with the row's own uniform
    (temperature <= 0: argmax).
    Greedy output equals transformers' greedy ``generate`` (tests/test_rollout.py); the sampled
    distribution is softmax(top_p_filter(logits / T)), the one ``return_logps`` reports.

    ``decode`` picks the loop after the prefill. "dynamic": the cache grows each step and finished
    rows leave the batch (best where each step is real work: CPU, large batches). "static": every
    tensor the decode step touches is preallocated -- keys/values for the whole completion, the
    attention mask, the input and position buffers -- and updated in place, with all rows kept to
    the end. "cuda_graph": the static step captured once per chunk in a CUDA graph and replayed per
    token, which removes the per-kernel launch cost that bounds a small model's decode on a GPU.
    "auto": cuda_graph on CUDA for models whose layers are all full attention, else dynamic.
    """

    def __init__(
        self, model, tokenizer, *, max_batch: int = 256, eos_token_id: int | None = None, decode: str = "auto"
    ):
        if decode not in ("auto", "dynamic", "static", "cuda_graph"):
            raise ValueError(f"decode: expected auto | dynamic | static | cuda_graph, got {decode!r}")
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        params = inspect.signature(type(_unwrap(model)).forward).parameters
        self._keep_arg = "logits_to_keep" in params
        # transformers >= 5.2x names the cache argument `cache`; earlier versions `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        config = _unwrap(model).config
        full_attention = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
        if decode in ("static", "cuda_graph") and not full_attention:
            raise ValueError(f"decode={decode!r} needs a model whose layers are all full attention")
        cuda = next(model.parameters()).is_cuda
        if decode == "cuda_graph" and not cuda:
            raise ValueError("decode='cuda_graph' needs the model on a CUDA device")
        self.decode = decode if decode != "auto" else ("cuda_graph" if cuda and full_attention else "dynamic")

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Generation:
        """``seeds``: one per output row (prompt-major, ``len(prompt_ids) * n``). Row r's draws then depend
        on ``seeds[r]`` alone -- not on the batch it shares, the chunking, or which process generates it
        -- so a rollout split over data-parallel ranks samples what one process samples. Without seeds
        the draws come from torch's global RNG."""
        if seeds is not None and len(seeds) != len(prompt_ids) * n:
            raise ValueError(f"seeds: one per output row ({len(prompt_ids) * n}), got {len(seeds)}")
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logps: list[list[float]] | None = [] if params.return_logps else None
        per_chunk = max(1, self.max_batch // n)
        self._stops = torch.tensor(sorted({self.eos, *params.stop_ids}), device=next(self.model.parameters()).device)
        try:
            for s in range(0, len(prompt_ids), per_chunk):
                chunk = prompt_ids[s : s + per_chunk]
                noise = uniform_noise(
                    len(chunk) * n,
                    params.max_new_tokens,
                    None if seeds is None else seeds[s * n : (s + len(chunk)) * n],
                )
                c, t, lp = self._generate_chunk(chunk, n, params, noise)
                completions += c
                truncated += t
                if logps is not None:
                    logps += lp
        finally:
            self.model.train(was_training)
        return Generation([list(p) for p in prompt_ids], completions, truncated, logps)

    def _sample(
        self, logits_BV: torch.Tensor, params: SamplingParams, u_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(next token (B,), its log-prob under the distribution it was drawn from, or None). The draw is
        inverse-CDF sampling with the row's own uniform ``u_B`` (see ``uniform_noise``)."""
        z_BV = logits_BV.float()
        if params.temperature <= 0:
            nxt_B = z_BV.argmax(-1)
        else:
            z_BV = top_p_filter(z_BV / params.temperature, params.top_p)
            nxt_B = inverse_cdf(z_BV.softmax(-1), u_B)
        if not params.return_logps:
            return nxt_B, None
        return nxt_B, z_BV.log_softmax(-1).gather(-1, nxt_B[:, None])[:, 0]

    def _generate_chunk(self, prompts: list[list[int]], n: int, params: SamplingParams, noise_BN: torch.Tensor):
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        ids_PL, attn_PL = _left_pad(prompts, pad, device)
        pos_PL = (attn_PL.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=_unwrap(self.model).config)
        keep = {"logits_to_keep": 1} if self._keep_arg else {}
        out = self.model(
            input_ids=ids_PL,
            attention_mask=attn_PL,
            position_ids=pos_PL,
            use_cache=True,
            **{self._cache_arg: cache},
            **keep,
        )
        if self.decode != "dynamic":
            return self._decode_static(out.logits[:, -1], cache, attn_PL, pos_PL, n, params, pad, noise_BN.to(device))
        # Prefill once per prompt (the cache is filled in place), then copy it to each of the n samples.
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits_BV = out.logits[:, -1].repeat_interleave(n, 0)
        attn_BT = attn_PL.repeat_interleave(n, 0)
        pos_B1 = pos_PL[:, -1:].repeat_interleave(n, 0) + 1
        B, T_new = logits_BV.shape[0], params.max_new_tokens
        tokens_BN = torch.full((B, T_new), pad, dtype=torch.long, device=device)
        logps_BN = torch.zeros((B, T_new), device=device) if params.return_logps else None
        length_B = torch.full((B,), T_new, dtype=torch.long, device=device)
        rows_A = torch.arange(B, device=device)  # batch row -> output row, for the A rows still in the batch
        done_A = torch.zeros(B, dtype=torch.bool, device=device)
        noise_BN = noise_BN.to(device)
        for t in range(T_new):
            nxt_A, lp_A = self._sample(logits_BV, params, noise_BN[rows_A, t])
            live_A = ~done_A
            tokens_BN[rows_A[live_A], t] = nxt_A[live_A]
            if lp_A is not None:
                logps_BN[rows_A[live_A], t] = lp_A[live_A]
            ended_A = live_A & torch.isin(nxt_A, self._stops)
            length_B[rows_A[ended_A]] = t + 1
            done_A |= ended_A
            n_done = int(done_A.sum())
            if n_done == len(done_A) or t == T_new - 1:
                break
            if n_done * 8 >= len(done_A):
                # Compacting copies the cache, so it waits until an eighth of the rows are finished.
                idx = (~done_A).nonzero()[:, 0]
                cache.batch_select_indices(idx)
                attn_BT, pos_B1, nxt_A, rows_A = attn_BT[idx], pos_B1[idx], nxt_A[idx], rows_A[idx]
                done_A = done_A[idx]
            attn_BT = torch.cat([attn_BT, attn_BT.new_ones((len(rows_A), 1))], 1)
            out = self.model(
                input_ids=nxt_A[:, None],
                attention_mask=attn_BT,
                position_ids=pos_B1,
                use_cache=True,
                **{self._cache_arg: cache},
            )
            logits_BV = out.logits[:, -1]
            pos_B1 = pos_B1 + 1
        return self._unpad(tokens_BN, length_B, logps_BN, T_new)

    def _unpad(self, tokens_BN, length_B, logps_BN, T_new):
        lengths = length_B.tolist()
        toks = tokens_BN.tolist()
        completions = [row[:k] for row, k in zip(toks, lengths)]
        stops = set(self._stops.tolist())
        truncated = [k == T_new and (k == 0 or row[k - 1] not in stops) for row, k in zip(toks, lengths)]
        lps = None
        if logps_BN is not None:
            lps = [row[:k] for row, k in zip(logps_BN.tolist(), lengths)]
        return completions, truncated, lps

    def _decode_static(
        self, logits_PV, cache, attn_PL, pos_PL, n: int, params: SamplingParams, pad: int, noise_BN: torch.Tensor
    ):
        """The decode loop over preallocated buffers (``decode`` static / cuda_graph). Column Lp + t of
        the cache holds token t of every row; a row's mask opens that column when the token is fed."""
        device = logits_PV.device
        (P, Lp), T_new = attn_PL.shape, params.max_new_tokens
        B, L = P * n, Lp + T_new
        keys, values = [], []
        for i in range(len(cache)):
            for src, out in zip(_layer_kv(cache, i), (keys, values)):
                buf = src.new_zeros((B, src.shape[1], L, src.shape[3]))
                buf[:, :, :Lp] = src.repeat_interleave(n, 0)
                out.append(buf)
        del cache
        kv = _StaticKV(keys, values)
        mask_B11L = torch.zeros((B, 1, 1, L), dtype=torch.bool, device=device)
        mask_B11L[:, 0, 0, :Lp] = attn_PL.bool().repeat_interleave(n, 0)
        ids_B1 = torch.full((B, 1), pad, dtype=torch.long, device=device)
        pos_B1 = pos_PL[:, -1:].repeat_interleave(n, 0) + 1

        def step() -> torch.Tensor:
            return self.model(
                input_ids=ids_B1, attention_mask=mask_B11L, position_ids=pos_B1, use_cache=True, **{self._cache_arg: kv}
            ).logits[:, -1]

        if self.decode != "cuda_graph" or T_new == 1:
            run = step
        else:
            # Warm up on a side stream, then capture one step. The warm-up writes column Lp, which the
            # first real step overwrites (and it opens that column, as the first real step does).
            kv.at.fill_(Lp)
            mask_B11L[:, 0, 0, Lp] = True
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits_static = step()

            def run() -> torch.Tensor:  # noqa: F811 -- the captured step
                graph.replay()
                return logits_static

        logits_BV = logits_PV.repeat_interleave(n, 0)
        tokens_BN = torch.full((B, T_new), pad, dtype=torch.long, device=device)
        logps_BN = torch.zeros((B, T_new), device=device) if params.return_logps else None
        length_B = torch.full((B,), T_new, dtype=torch.long, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(T_new):
            nxt_B, lp_B = self._sample(logits_BV, params, noise_BN[:, t])
            live_B = ~done_B
            tokens_BN[:, t] = torch.where(live_B, nxt_B, pad)
            if lp_B is not None:
                logps_BN[:, t] = torch.where(live_B, lp_B, 0.0)
            ended_B = live_B & torch.isin(nxt_B, self._stops)
            length_B = torch.where(ended_B, t + 1, length_B)
            done_B |= ended_B
            # Every row runs to the end of the chunk or until all are done (checked every 8 tokens:
            # each check is a device sync).
            if t == T_new - 1 or (t % 8 == 7 and bool(done_B.all())):
                break
            ids_B1.copy_(nxt_B[:, None])
            kv.at.fill_(Lp + t)
            mask_B11L[:, 0, 0, Lp + t] = True
            logits_BV = run()
            pos_B1.add_(1)
        return self._unpad(tokens_BN, length_B, logps_BN, T_new)


class _StaticKV:
    """Keys/values preallocated for the whole completion, (B, H_kv, L, D) per layer, written in place at
    column ``at`` (a 1-element tensor on the device). No tensor moves or grows, so a captured CUDA graph
    can replay the step. Implements what the Llama/Qwen2-style attention calls while decoding with a
    ready 4D mask and explicit positions: ``update``."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.at = torch.zeros(1, dtype=torch.long, device=keys[0].device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.at, key_states)
        v.index_copy_(2, self.at, value_states)
        return k, v


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's keys and values from a transformers DynamicCache (v5 layers, or v4 lists)."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _unwrap(model):
    """The transformers model under a PEFT wrapper (for its config and forward signature)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
