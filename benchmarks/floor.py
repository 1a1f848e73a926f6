"""The compute floor of one GRPO step, and how close posttrain's step gets to it.

Run (2-core CPU defaults, ~1-2 minutes):
    .venv/bin/python benchmarks/floor.py
GPU, ~0.5B Qwen2 shape with a real-size vocabulary:
    .venv/bin/python benchmarks/floor.py --preset qwen2-0.5b --arch qwen2 --vocab-size 151936 \\
        --device cuda --dtype bfloat16 --prompts 16 --generations 8 --max-completion-length 256

The floor is what any trainer built on a transformers model must run for one step, in plain torch:
  1. generate: the textbook KV-cache sampling loop -- left-pad the P*G prompts, one prefill forward,
     then one forward per new token (transformers DynamicCache) with a multinomial draw at
     temperature 1, until every row has emitted EOS or max_completion_length is reached. Not
     ``model.generate``: its logits processors, stopping criteria and bookkeeping are overhead, not
     the work; a bare loop over the same model forward is the least a KV-cache sampler does.
     (It computes finished rows and every copy of a prompt, as the textbook loop does; posttrain's
     engine skips both, so its generate time can be *below* this floor.)
  2. update: one forward over the same P*G prompt+completion sequences (right-padded, one batch),
     log-softmax of the completion tokens, a token-mean policy-gradient loss, one backward, one
     AdamW step.
posttrain's step is its GRPO recipe (``posttrain.recipes.grpo.train``) with the same model, prompts,
P, G, lengths and DAPO settings as benchmarks/grpo_vs_trl.py; its time split comes from the recipe's
own metrics (time/generate, time/reward, time/logps, time/update), and its step time is the wall
clock between the ends of consecutive steps (so it includes logging and every other per-step cost).
The two alternate in one process, --rounds times; medians are reported. Target: ratio <= 1.25.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

TARGET_RATIO = 1.25


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--vocab-size", type=int, default=0, help="pad the char vocab to this size (0: ~105 tokens)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", "-P", type=int, default=8)
    ap.add_argument("--generations", "-G", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see grpo_vs_trl.py --help)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra posttrain GRPO config override (repeatable), e.g. padding_free=false",
    )
    return ap.parse_args(argv)


def posttrain_round(a, model_dir: Path, run_dir: Path) -> tuple[list[float], dict]:
    """(wall seconds of each timed step, mean time/* split of the timed steps)."""
    from posttrain.recipes import grpo
    from posttrain.runtime.tracking import read_metrics

    total = a.warmup + a.steps
    cfg = bc.grpo_bench_config(a, model_dir, run_dir)
    grpo.train(cfg)
    m = read_metrics(run_dir)
    walls = [m[i]["wall_time"] - m[i - 1]["wall_time"] for i in range(a.warmup, total)]
    split = {k: bc.median([r[f"time/{k}"] for r in m[a.warmup :]]) for k in ("generate", "reward", "logps", "update")}
    split["tokens"] = bc.median([r["completion_len/mean"] * a.prompts * a.generations for r in m[a.warmup :]])
    return walls, split


class Floor:
    """The plain-torch step described in the module docstring."""

    def __init__(self, a, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from posttrain.models.loading import load_tokenizer

        self.a, self.torch = a, torch
        self.tok = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, a.dtype)).to(a.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, weight_decay=0.0)
        params = __import__("inspect").signature(type(self.model).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        torch, m, a = self.torch, self.model, self.a
        from transformers import DynamicCache

        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.tensor(p)
            attn[i, L - len(p) :] = 1
        ids, attn = ids.to(a.device), attn.to(a.device)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        m.eval()
        out_tokens = []
        with torch.no_grad():
            cache = DynamicCache(config=m.config)
            logits = m(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{self.cache_arg: cache}
            ).logits[:, -1]
            pos = pos[:, -1:] + 1
            done = torch.zeros(B, dtype=torch.bool, device=a.device)
            for t in range(a.max_completion_length):
                nxt = torch.multinomial(logits.float().softmax(-1), 1)
                out_tokens.append(nxt)
                done |= nxt[:, 0] == eos
                if bool(done.all()) or t == a.max_completion_length - 1:
                    break
                attn = torch.cat([attn, attn.new_ones((B, 1))], 1)
                logits = m(
                    input_ids=nxt, attention_mask=attn, position_ids=pos, use_cache=True, **{self.cache_arg: cache}
                ).logits[:, -1]
                pos = pos + 1
        m.train()
        rows = torch.cat(out_tokens, 1).tolist()
        return [r[: r.index(eos) + 1] if eos in r else r for r in rows]

    def update(self, prompts: list[list[int]], completions: list[list[int]]) -> None:
        torch, m, a = self.torch, self.model, self.a
        seqs = [p + c for p, c in zip(prompts, completions)]
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        loss_mask = torch.zeros((B, T))
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            loss_mask[i, len(p) - 1 : len(s) - 1] = 1  # positions that predict a completion token
        ids, attn, loss_mask = ids.to(a.device), attn.to(a.device), loss_mask.to(a.device)
        adv = torch.randn(B, 1, device=a.device)
        logits = m(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        mask = loss_mask[:, :-1]
        loss = -(logp * adv * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def round(self, prompts_by_step: list[list[list[int]]]) -> tuple[list[float], list[dict]]:
        walls, splits = [], []
        G = self.a.generations
        for i, prompts in enumerate(prompts_by_step):
            rows = [p for p in prompts for _ in range(G)]
            t0 = time.perf_counter()
            comps = self.generate(rows)
            bc.sync(self.a.device)
            t1 = time.perf_counter()
            self.update(rows, comps)
            bc.sync(self.a.device)
            t2 = time.perf_counter()
            if i >= self.a.warmup:
                walls.append(t2 - t0)
                splits.append({"generate": t1 - t0, "update": t2 - t1, "tokens": sum(map(len, comps))})
        return walls, splits


def main(argv=None) -> None:
    a = parse_args(argv)
    bc.set_threads(a.threads)
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("posttrain").setLevel(logging.WARNING)
    from posttrain.models.loading import load_tokenizer
    from posttrain.tasks import get_task

    print(f"machine: {bc.machine()}; load average {bc.load_average()}")
    print(
        f"preset={a.preset} arch={a.arch} vocab={a.vocab_size or 'char'} device={a.device} dtype={a.dtype} "
        f"P={a.prompts} G={a.generations} max_completion_length={a.max_completion_length} steps={a.steps} "
        f"(+{a.warmup} warmup) rounds={a.rounds} threads={torch.get_num_threads()}"
    )
    total = a.warmup + a.steps
    pt_walls, pt_splits, fl_walls, fl_splits = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        model_dir = bc.build_model_dir(Path(d) / "model", a.preset, a.arch, a.vocab_size, a.seed)
        tok = load_tokenizer(model_dir)
        rows = get_task("arithmetic").rows(a.prompts * total)
        ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        prompts_by_step = [ids[s * a.prompts : (s + 1) * a.prompts] for s in range(total)]
        for r in range(a.rounds):
            torch.manual_seed(a.seed + r)
            floor = Floor(a, model_dir)  # fresh weights and optimizer each round, as the recipe has
            w, s = floor.round(prompts_by_step)
            fl_walls += w
            fl_splits += s
            del floor
            w, s = posttrain_round(a, model_dir, Path(d) / f"run{r}")
            pt_walls += w
            pt_splits.append(s)
            print(
                f"  round {r + 1}: posttrain {bc.median(w):.3f} s/step, floor {bc.median(fl_walls[-a.steps :]):.3f} "
                f"s/step",
                flush=True,
            )
    pt, fl = bc.median(pt_walls), bc.median(fl_walls)
    fl_gen, fl_upd = bc.median([s["generate"] for s in fl_splits]), bc.median([s["update"] for s in fl_splits])
    split = {k: bc.median([s[k] for s in pt_splits]) for k in pt_splits[0]}
    print(f"\nmedians over {len(pt_walls)} timed steps each (load average now {bc.load_average()}):")
    print(
        f"  floor    : {fl:.3f} s/step = generate {fl_gen:.3f} + forward/backward/AdamW {fl_upd:.3f} "
        f"({bc.median([s['tokens'] for s in fl_splits]):.0f} completion tokens/step)"
    )
    print(
        f"  posttrain: {pt:.3f} s/step = generate {split['generate']:.3f} + reward {split['reward']:.3f} + "
        f"logps {split['logps']:.3f} + update {split['update']:.3f} + other "
        f"{pt - sum(split[k] for k in ('generate', 'reward', 'logps', 'update')):.3f} "
        f"({split['tokens']:.0f} completion tokens/step)"
    )
    print(
        f"  posttrain / floor: x{pt / fl:.2f} (target <= {TARGET_RATIO}); generate x{split['generate'] / fl_gen:.2f}, "
        f"update x{split['update'] / fl_upd:.2f}"
    )


if __name__ == "__main__":
    main()
