"""One rank of tests/test_vllm.py's torchrun check: its own colocated vLLM engine beside the job's
process group (gloo). Writes rank<N>.json into the directory given as the first argument (a file per
rank: two ranks printing at once interleave their lines)."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from posttrain.models.tiny import build_tokenizer  # noqa: E402
from posttrain.rollout.engine import SamplingParams  # noqa: E402
from test_vllm import _engine, _max_diff, _model, _prompts, _teacher_forced  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = build_tokenizer("char")
    model = _model(tok, 0.1)
    prompts = _prompts(tok)[:2]
    params = SamplingParams(16, temperature=1.0, return_logps=True)
    engine = _engine(model, tok)
    gen = engine.generate(prompts, 2, params)
    before = _max_diff(gen.logps, _teacher_forced(model, prompts, 2, gen.completion_ids, 1.0))
    with torch.no_grad():  # the same step on every rank, as data parallelism keeps replicas equal
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    engine.sync_weights()
    pushed = engine.generate(prompts, 2, params)
    after = _max_diff(pushed.logps, _teacher_forced(model, prompts, 2, pushed.completion_ids, 1.0))
    engine.close()
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)  # the job's process group outlives the engine
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump(
            {"rank": rank, "samples": gen.completion_ids, "before": before, "after": after, "sum": int(total)}, fh
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
