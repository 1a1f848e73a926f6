"""Turn sessions: generation for trajectories that grow turn by turn (multi-turn episodes).

``session.generate(keys, contexts, params, seeds, limits)`` samples one turn for each trajectory ``keys[i]``
whose whole token context so far is ``contexts[i]``. Between two calls a trajectory's context may only grow
(the environment's tokens and the policy's last turn appended): a context that is not an extension of what
the session holds is an error, never silently re-rendered.

- ``KVSession`` (the native engine): the KV cache stays alive across turns, so each call prefills only the
  tokens a trajectory gained since the last call -- the last sampled token and the environment's delta --
  instead of its whole context. Rows keep their own positions (0, 1, 2, ... over their real tokens) and the
  cache columns a row did not use (padding inside a prefill block, decode steps after it stopped) are masked,
  so a row's logits are those of re-prefilling its context alone (tests/test_multiturn.py).
- ``ReprefillSession`` (any engine): each call generates from the whole contexts. With vLLM this is the
  token-in/token-out path with prefix caching (the shared prefix is not recomputed); with the native engine it
  is the baseline ``benchmarks/multiturn.py`` compares the KV session with.

``limits[i]`` caps row i's new tokens below ``params.max_new_tokens`` (the trajectory's remaining budget);
the sampling noise always has ``params.max_new_tokens`` columns, so a row's draws depend on its seed alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch
from transformers import DynamicCache

from posttrain.rollout.engine import Generation, KVCacheEngine, SamplingParams, _layer_kv, _unwrap, uniform_noise


class TurnSession(Protocol):
    def generate(
        self,
        keys: Sequence[Hashable],
        contexts: Sequence[list[int]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
        limits: Sequence[int] | None = None,
    ) -> Generation: ...

    def close(self) -> None: ...


def open_session(engine, *, reuse_kv: bool = True) -> TurnSession:
    """The session for ``engine``: KV reuse on the native engine (unless ``reuse_kv`` is off), else re-prefill."""
    if reuse_kv and isinstance(engine, KVCacheEngine):
        return KVSession(engine)
    return ReprefillSession(engine)


class ReprefillSession:
    """Each turn generates from the whole context (vLLM: prefix-cached; native: the re-prefill baseline)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, keys, contexts, params, seeds=None, limits=None) -> Generation:
        limits = list(limits) if limits is not None else [params.max_new_tokens] * len(contexts)
        completions: list[list[int] | None] = [None] * len(contexts)
        truncated: list[bool] = [False] * len(contexts)
        logps: list[list[float] | None] = [None] * len(contexts)
        for cap in sorted(set(limits)):  # one call per distinct budget (usually one)
            rows = [i for i, k in enumerate(limits) if k == cap]
            p = SamplingParams(cap, params.temperature, params.top_p, params.return_logps, params.stop_ids)
            gen = self.engine.generate(
                [list(contexts[i]) for i in rows], 1, p, None if seeds is None else [seeds[i] for i in rows]
            )
            for j, i in enumerate(rows):
                completions[i], truncated[i] = gen.completion_ids[j], gen.truncated[j]
                if gen.logps is not None:
                    logps[i] = gen.logps[j]
        return Generation([list(c) for c in contexts], completions, truncated, logps if params.return_logps else None)

    def close(self) -> None:
        pass


class KVSession:
    """Multi-turn generation on ``KVCacheEngine``'s model with one KV cache kept across turns."""

    def __init__(self, engine: KVCacheEngine):
        self.e = engine
        self.model = engine.model
        self.device = next(self.model.parameters()).device
        self.pad = engine.tok.pad_token_id if engine.tok.pad_token_id is not None else engine.eos
        self.keys: list[Hashable] = []  # batch row -> trajectory
        self.fed: list[list[int]] = []  # the tokens each row has in the cache (its real ones, in order)
        self.cache = None
        self.attn_BT: torch.Tensor | None = None  # which cache columns are a row's real tokens
        self.prefilled_tokens = 0  # tokens run through the model outside decoding (benchmarks read it)

    def close(self) -> None:
        self.cache, self.attn_BT, self.keys, self.fed = None, None, [], []

    @torch.no_grad()
    def generate(self, keys, contexts, params, seeds=None, limits=None) -> Generation:
        if seeds is not None and len(seeds) != len(keys):
            raise ValueError(f"seeds: one per trajectory ({len(keys)}), got {len(seeds)}")
        was_training = self.model.training
        self.model.eval()
        try:
            if self.cache is None:
                logits_BV = self._prefill(list(keys), [list(c) for c in contexts])
            else:
                logits_BV = self._extend(list(keys), [list(c) for c in contexts])
            out = self._decode(logits_BV, params, seeds, limits)
        finally:
            self.model.train(was_training)
        return Generation([list(c) for c in contexts], *out)

    def _forward(self, ids_BL, pos_BL):
        keep = {"logits_to_keep": 1} if self.e._keep_arg else {}
        return self.model(
            input_ids=ids_BL,
            attention_mask=self.attn_BT,
            position_ids=pos_BL,
            use_cache=True,
            **{self.e._cache_arg: self.cache},
            **keep,
        ).logits[:, -1]

    def _prefill(self, keys, contexts) -> torch.Tensor:
        """The first turn: each distinct context prefilled once (a group's G trajectories share a prompt),
        its cache rows then copied to the trajectories that share it."""
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(c), len(distinct)) for c in contexts]
        uniq = [list(c) for c in distinct]
        L = max(len(c) for c in uniq)
        ids = torch.full((len(uniq), L), self.pad, dtype=torch.long)
        attn = torch.zeros((len(uniq), L), dtype=torch.long)
        for i, c in enumerate(uniq):
            ids[i, L - len(c) :] = torch.tensor(c)
            attn[i, L - len(c) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        self.cache = DynamicCache(config=_unwrap(self.model).config)
        self.attn_BT = attn
        logits_UV = self._forward(ids, (attn.cumsum(1) - 1).clamp(min=0))
        self.prefilled_tokens += sum(len(c) for c in uniq)
        idx = torch.tensor(row_of, device=self.device)
        if len(uniq) != len(contexts) or row_of != list(range(len(contexts))):
            self.cache.batch_select_indices(idx)
        self.attn_BT = attn[idx]
        self.keys, self.fed = keys, [list(c) for c in contexts]
        return logits_UV[idx]

    def _extend(self, keys, contexts) -> torch.Tensor:
        """Later turns: drop the rows no longer asked for, then prefill each row's new tokens (left-padded
        within the block, masked padding) at the row's own next positions."""
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise ValueError(f"turn session: trajectories {missing[:3]} were not in its first turn")
        idx = [where[k] for k in keys]
        if idx != list(range(len(self.keys))):
            self.cache.batch_select_indices(torch.tensor(idx, device=self.device))
            self.attn_BT = self.attn_BT[torch.tensor(idx, device=self.device)]
            self.fed = [self.fed[i] for i in idx]
            self.keys = list(keys)
        self._drop_dead_columns()
        new = []
        for k, fed, ctx in zip(keys, self.fed, contexts):
            if ctx[: len(fed)] != fed or len(ctx) == len(fed):
                raise ValueError(
                    f"turn session: trajectory {k!r}'s context is not an extension of what was generated "
                    f"({len(fed)} tokens held, {len(ctx)} given); a turn may only append"
                )
            new.append(ctx[len(fed) :])
        L = max(len(x) for x in new)
        ids = torch.full((len(new), L), self.pad, dtype=torch.long)
        attn = torch.zeros((len(new), L), dtype=torch.long)
        pos = torch.zeros((len(new), L), dtype=torch.long)
        for i, (x, fed) in enumerate(zip(new, self.fed)):
            ids[i, L - len(x) :] = torch.tensor(x)
            attn[i, L - len(x) :] = 1
            pos[i, L - len(x) :] = torch.arange(len(fed), len(fed) + len(x))
        self.attn_BT = torch.cat([self.attn_BT, attn.to(self.device)], 1)
        logits_BV = self._forward(ids.to(self.device), pos.to(self.device))
        self.prefilled_tokens += sum(len(x) for x in new)
        for fed, x in zip(self.fed, new):
            fed += x
        return logits_BV

    def _decode(self, logits_BV, params: SamplingParams, seeds, limits):
        """Sample each row until a stop token or its limit. Returns (completions, truncated, logps).

        As in the engine's own loop, rows that stopped leave the working batch once an eighth of it has (their
        cache rows are parked and put back, behind masked columns, when the turn ends), so a turn costs what
        its live rows cost, not its longest row times the batch."""
        B, T_new, dev = logits_BV.shape[0], params.max_new_tokens, self.device
        limit_B = torch.tensor(list(limits) if limits is not None else [T_new] * B, device=dev).clamp(max=T_new)
        stops = torch.tensor(sorted({self.e.eos, *params.stop_ids}), device=dev)
        noise_BN = uniform_noise(B, T_new, seeds).to(dev)
        tokens_BN = torch.full((B, T_new), self.pad, dtype=torch.long, device=dev)
        logps_BN = torch.zeros((B, T_new), device=dev)
        length_B = torch.full((B,), T_new, dtype=torch.long, device=dev)
        stopped_B = torch.zeros(B, dtype=torch.bool, device=dev)
        fed_B = torch.zeros(B, dtype=torch.long, device=dev)  # this turn's tokens put in the cache
        rows_A = torch.arange(B, device=dev)  # working row -> batch row, for the A rows still decoding
        done_A = limit_B <= 0
        pos_A1 = torch.tensor([[len(f)] for f in self.fed], device=dev)
        parked: list[tuple[torch.Tensor, list, list, torch.Tensor]] = []
        for t in range(T_new):
            if bool(done_A.all()):
                break
            if t and int(done_A.sum()) * 8 >= len(done_A):
                parked.append(self._park(rows_A, done_A))
                keep = (~done_A).nonzero()[:, 0]
                rows_A, done_A, pos_A1, logits_BV = rows_A[keep], done_A[keep], pos_A1[keep], logits_BV[keep]
            nxt_A, lp_A = self.e._sample(logits_BV, params, noise_BN[rows_A, t])
            live_A = ~done_A
            tokens_BN[rows_A, t] = torch.where(live_A, nxt_A, self.pad)
            if lp_A is not None:
                logps_BN[rows_A, t] = torch.where(live_A, lp_A, 0.0)
            hit_A = live_A & torch.isin(nxt_A, stops)
            ended_A = hit_A | (live_A & (limit_B[rows_A] <= t + 1))
            stopped_B[rows_A] |= hit_A
            length_B[rows_A] = torch.where(ended_A, t + 1, length_B[rows_A])
            done_A = done_A | ended_A
            if bool(done_A.all()):
                break
            # Feed token t of every row that sampled one (a row that just stopped too: its stop token is
            # context for the next turn); rows done earlier get a masked column.
            self.attn_BT = torch.cat([self.attn_BT, live_A.long()[:, None]], 1)
            logits_BV = self._forward(torch.where(live_A, nxt_A, self.pad)[:, None], pos_A1)
            pos_A1 = pos_A1 + live_A.long()[:, None]
            fed_B[rows_A] = torch.where(live_A, t + 1, fed_B[rows_A])
        if parked:
            self._unpark(rows_A, parked, B)
        length_B = torch.where(limit_B <= 0, 0, length_B)
        toks, lengths, fed = tokens_BN.tolist(), length_B.tolist(), fed_B.tolist()
        completions = [row[:k] for row, k in zip(toks, lengths)]
        for f, row, k in zip(self.fed, completions, fed):
            f += row[:k]
        truncated = [not s for s in stopped_B.tolist()]
        lps = [row[:k] for row, k in zip(logps_BN.tolist(), lengths)] if params.return_logps else None
        return completions, truncated, lps

    def _park(self, rows_A, done_A):
        """Take the stopped rows out of the working cache: (their batch rows, keys, values, mask)."""
        idx = done_A.nonzero()[:, 0]
        keys, values = zip(*(_layer_kv(self.cache, i) for i in range(len(self.cache))))
        out = (rows_A[idx], [k[idx] for k in keys], [v[idx] for v in values], self.attn_BT[idx])
        keep = (~done_A).nonzero()[:, 0]
        self.cache.batch_select_indices(keep)
        self.attn_BT = self.attn_BT[keep]
        return out

    def _unpark(self, rows_A, parked, B: int) -> None:
        """Put the parked rows back in batch order; the columns they were out for are masked (zeros)."""
        T = self.attn_BT.shape[1]
        attn = self.attn_BT.new_zeros((B, T))
        attn[rows_A] = self.attn_BT
        for rows, _, _, mask in parked:
            attn[rows, : mask.shape[1]] = mask
        for i in range(len(self.cache)):
            for j, live in enumerate(_layer_kv(self.cache, i)):
                full = live.new_zeros((B, live.shape[1], T, live.shape[3]))
                full[rows_A] = live
                for rows, keys, values, _ in parked:
                    part = (keys, values)[j][i]
                    full[rows, :, : part.shape[2]] = part
                _set_layer_kv(self.cache, i, j, full)
        self.attn_BT = attn

    def _drop_dead_columns(self) -> None:
        """Cache columns no row attends to (padding, decode steps after a row stopped) go before a turn."""
        used = self.attn_BT.bool().any(0)
        if bool(used.all()):
            return
        cols = used.nonzero()[:, 0]
        for i in range(len(self.cache)):
            for j, kv in enumerate(_layer_kv(self.cache, i)):
                _set_layer_kv(self.cache, i, j, kv[:, :, cols])
        self.attn_BT = self.attn_BT[:, cols]


def _set_layer_kv(cache, i: int, j: int, value: torch.Tensor) -> None:
    """Replace layer i's keys (j=0) or values (j=1) of a transformers DynamicCache (v5 layers, or v4 lists)."""
    if hasattr(cache, "layers"):
        setattr(cache.layers[i], ("keys", "values")[j], value)
    else:
        (cache.key_cache, cache.value_cache)[j][i] = value
