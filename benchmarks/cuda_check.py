"""CUDA correctness checks for the GPU-only paths (run on a GPU machine; CI has none).

    python benchmarks/cuda_check.py            # exits 1 if any check fails

Checks, each printed PASS/FAIL with its measured error:
  1. KVCacheEngine greedy output on CUDA (float32) equals transformers' greedy ``generate`` on CUDA,
     with rows ending at different steps, for each decode loop (dynamic: batch compaction; static;
     cuda_graph: the step captured and replayed), and cuda_graph's sampling log-probs equal a
     teacher-forced forward;
  2. ``completion_logps`` (LM head on completion positions, tiled, recomputed in backward) on CUDA
     against full logits in float64 on the same weights: float32 log-probs and gradients, and a
     bfloat16 model's log-probs within bf16 round-off;
  3. the padding-free (packed) GRPO update equals the padded update;
  4. a few steps of the GRPO and SFT recipes on CUDA in bfloat16 (tiny Qwen2 shape): finite losses,
     parameters still bf16, the final model saved and reloaded on CUDA.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' model and groups, toy_rewards

RESULTS: list[tuple[str, bool, str]] = []
DEV = "cuda"  # --device cpu: a smoke run of this script where there is no GPU


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def peaked(tok, arch, seed=0):
    """The tests' large-weight tiny model (its greedy output depends on the context)."""
    from test_rollout import _peaked_model

    return _peaked_model(tok, arch, seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_greedy(tok) -> None:
    from posttrain.rollout.engine import KVCacheEngine, SamplingParams, _left_pad

    texts = ["12+7=", "3-1=", "45+45-9=", "8=", "70-3+2=", "6+60="]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for arch in ("llama", "qwen2"):
        model = peaked(tok, arch).to(DEV)
        ids, attn = _left_pad([p for p in prompts for _ in range(2)], tok.pad_token_id, DEV)
        model.eval()
        free = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
        )[:, ids.shape[1] :].tolist()
        # EOS := a token whose first position differs most between rows, so rows end at different steps.
        best = max(set(sum(free, [])), key=lambda t: len({r.index(t) if t in r else -1 for r in free}))
        ref = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=best,
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :].tolist()
        ref = [r[: r.index(best) + 1] if best in r else r for r in ref]
        lengths = sorted({len(c) for c in ref})
        for decode in ("dynamic", "static") + (("cuda_graph",) if DEV.startswith("cuda") else ()):
            gen = KVCacheEngine(model, tok, eos_token_id=best, decode=decode).generate(
                prompts, 2, SamplingParams(24, temperature=0)
            )
            check(
                f"greedy KVCacheEngine[{decode}] == generate ({arch}, {DEV} fp32)",
                gen.completion_ids == ref,
                f"{sum(a == b for a, b in zip(gen.completion_ids, ref))}/{len(ref)} rows equal; lengths {lengths}",
            )
        if DEV.startswith("cuda"):
            check_sampled_logps(model, tok, prompts, best)


def check_sampled_logps(model, tok, prompts, eos) -> None:
    """CUDA-graph decoding samples from the model's distribution at every step: its sampling log-probs
    equal a teacher-forced forward over the sampled completions."""
    from posttrain.data.collate import collate_padded
    from posttrain.data.tokenize import Example
    from posttrain.losses.logprobs import forward_logits, token_logps
    from posttrain.rollout.engine import KVCacheEngine, SamplingParams

    torch.manual_seed(1)
    gen = KVCacheEngine(model, tok, eos_token_id=eos, decode="cuda_graph").generate(
        prompts, 3, SamplingParams(20, temperature=0.8, return_logps=True)
    )
    seqs = [(prompts[i // 3], c) for i, c in enumerate(gen.completion_ids)]
    b = collate_padded([Example(p + c, (0,) * len(p) + (1,) * len(c)) for p, c in seqs], tok.pad_token_id).to(DEV)
    with torch.no_grad():
        lp = token_logps(forward_logits(model, b.input_ids_BT, b.attention_mask, b.position_ids_BT), b.targets_BT, 0.8)
    worst = max(
        (torch.tensor(gen.logps[i]) - lp[i, len(p) - 1 : len(p) - 1 + len(c)].cpu()).abs().max().item()
        for i, (p, c) in enumerate(seqs)
    )
    check(
        "sampling log-probs of cuda_graph decoding == teacher-forced forward",
        worst < 1e-3,
        f"max abs difference {worst:.1e} over {sum(map(len, gen.completion_ids))} tokens, "
        f"lengths {sorted({len(c) for c in gen.completion_ids})}",
    )


def check_logps(tok) -> None:
    from posttrain.data.collate import collate_padded
    from posttrain.data.tokenize import Example
    from posttrain.losses.logprobs import completion_logps, forward_logits

    torch.manual_seed(0)
    exs = []
    for i in range(6):
        p = torch.randint(5, 90, (3 + i,)).tolist()
        c = torch.randint(5, 90, (40 - 5 * i,)).tolist()
        exs.append(Example(p + c, (0,) * len(p) + (1,) * len(c)))
    b = collate_padded(exs, tok.pad_token_id)
    cpu64 = peaked(tok, "qwen2", seed=7).double()
    logits = forward_logits(cpu64, b.input_ids_BT, b.attention_mask, b.position_ids_BT)
    m64 = b.target_mask_BT.double()
    lp_ref = logits.log_softmax(-1).gather(-1, b.targets_BT[..., None])[..., 0] * m64
    w = torch.randn(m64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (lp_ref * w).sum().backward()
    grads_ref = {n: p.grad for n, p in cpu64.named_parameters()}

    for dtype, tol_lp, tol_g in ((torch.float32, 1e-4, 1e-3), (torch.bfloat16, 3e-2, None)):
        model = copy.deepcopy(cpu64).to(DEV, dtype)
        model.zero_grad(set_to_none=True)
        mb = {
            k: v.to(DEV)
            for k, v in (
                ("ids", b.input_ids_BT),
                ("attn", b.attention_mask),
                ("pos", b.position_ids_BT),
                ("tgt", b.targets_BT),
            )
        }
        m = b.target_mask_BT.to(DEV, torch.float32)
        lp, _ = completion_logps(model, mb["ids"], mb["attn"], mb["pos"], mb["tgt"], m, chunk_tokens=17)
        e = rel(lp * m, lp_ref)
        check(
            f"completion_logps vs float64 full logits ({DEV} {str(dtype)[6:]})",
            e < tol_lp,
            f"relative error {e:.2e} (tolerance {tol_lp:g})",
        )
        if tol_g is not None:
            (lp * m * w.to(DEV, lp.dtype)).sum().backward()
            worst = max(rel(p.grad, grads_ref[n]) for n, p in model.named_parameters())
            check(
                f"completion_logps gradients vs float64 ({DEV} {str(dtype)[6:]})",
                worst < tol_g,
                f"worst parameter relative error {worst:.2e} (tolerance {tol_g:g})",
            )


def check_padding_free(tok) -> None:
    """The packed (padding-free) GRPO update equals the padded one on the GPU (float32, SDPA with a
    block-diagonal 4D mask), in loss and in the updated weights."""
    from posttrain.recipes import grpo
    from test_grpo import _cfg, _varied_groups

    base = peaked(tok, "qwen2", seed=1).to(DEV)
    with tempfile.TemporaryDirectory() as d:
        out = []
        for packed in (False, True):
            cfg = _cfg(
                Path(d),
                f"padding_free={str(packed).lower()}",
                "train.micro_batch_size=5",
                "aggregation=seq_mean_token_mean",
                "optim.max_grad_norm=0",
            )
            m = copy.deepcopy(base)
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            met = grpo.update_policy(
                cfg,
                m,
                None,
                _varied_groups(),
                opt,
                sched,
                grpo.make_policy_loss(cfg),
                0,
                DEV,
                {"logps": 0.0, "update": 0.0},
                1,
            )
            out.append((m, met))
    (a, ma), (b, mb) = out
    worst = max(rel(pb - p0, pa - p0) for pa, pb, p0 in zip(a.parameters(), b.parameters(), base.parameters()))
    check(
        f"padding-free GRPO update == padded ({DEV} fp32)",
        abs(ma["loss"] - mb["loss"]) < 1e-5 and worst < 1e-3,
        f"loss {ma['loss']:.6f} vs {mb['loss']:.6f}; worst relative difference of the weight updates {worst:.1e}",
    )


def check_recipes() -> None:
    from posttrain.config import GRPOConfig, ModelConfig, SFTConfig, config_from_dict
    from posttrain.models.loading import load_model
    from posttrain.recipes import grpo, sft
    from posttrain.runtime.tracking import read_metrics

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "grpo"
        cfg = config_from_dict(
            GRPOConfig,
            {},
            [
                f"train.output_dir={out}",
                "train.progress=false",
                "model=tiny",
                "model.arch=qwen2",
                f"model.device={DEV}",
                "model.dtype=bfloat16",
                "data.path=builtin:arithmetic",
                "data.num_examples=64",
                "rewards=[toy_rewards:ones]",
                "prompts_per_step=4",
                "num_generations=8",
                "max_completion_length=16",
                "optim.lr=3e-3",
                "train.steps=4",
                "train.micro_batch_size=16",
                "samples_every=0",
            ],
        )
        grpo.train(cfg)
        m = read_metrics(out)
        finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in m)
        check(
            f"GRPO recipe, 4 steps on {DEV} bf16",
            finite and len(m) == 4,
            f"{len(m)} steps, loss {[round(r['loss'], 4) for r in m]}, reward {[round(r['reward/mean'], 3) for r in m]}",
        )
        model, _ = load_model(ModelConfig(path=str(out / "final"), device=DEV, dtype="bfloat16"))
        dts = {p.dtype for p in model.parameters()}
        check(
            f"GRPO final model reloads on {DEV} in bf16",
            dts == {torch.bfloat16} and next(model.parameters()).device.type == torch.device(DEV).type,
            f"dtypes {dts}",
        )

        out = Path(d) / "sft"
        cfg = config_from_dict(
            SFTConfig,
            {},
            [
                f"train.output_dir={out}",
                "train.progress=false",
                "model=tiny",
                f"model.device={DEV}",
                "model.dtype=bfloat16",
                "data.path=builtin:arithmetic",
                "data.num_examples=64",
                "train.steps=6",
                "train.micro_batch_size=8",
                "optim.lr=3e-3",
                "packing=true",
            ],
        )
        sft.train(cfg)
        m = read_metrics(out)
        losses = [r["loss"] for r in m if "loss" in r]
        check(
            f"SFT recipe (packed), 6 steps on {DEV} bf16",
            len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0],
            f"loss {[round(x, 3) for x in losses]}",
        )


def main() -> int:
    global DEV
    if "--device" in sys.argv:
        DEV = sys.argv[sys.argv.index("--device") + 1]
    if DEV.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    from posttrain.models.tiny import build_tokenizer

    print(f"device: {torch.cuda.get_device_name(0) if DEV.startswith('cuda') else DEV}; torch {torch.__version__}")
    tok = build_tokenizer("char")
    for fn in (check_greedy, check_logps, check_padding_free, check_recipes):
        try:
            fn(tok) if fn is not check_recipes else fn()
        except Exception as e:  # report and go on: one broken path should not hide the others
            import traceback

            traceback.print_exc()
            check(getattr(fn, "__name__", "check"), False, f"{type(e).__name__}: {e}")
    bad = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed" + (f"; failed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
