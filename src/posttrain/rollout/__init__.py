"""Generation engines behind one small interface (``RolloutEngine``): the native KV-cache engine
(``engine``) and a colocated vLLM (``vllm_engine``). Nothing downstream depends on which made a rollout.

May import: models, data, config, runtime; never rewards, evaluation, run or above.
"""

from posttrain.config import VLLMConfig
from posttrain.rollout.engine import Generation, HFEngine, KVCacheEngine, RolloutEngine, SamplingParams
from posttrain.rollout.vllm_engine import VLLMEngine

ENGINES = ("native", "vllm")


def make_engine(
    kind: str,
    model,
    tokenizer,
    *,
    max_batch: int = 256,
    decode: str = "auto",
    vllm=None,
    max_model_len: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> RolloutEngine:
    """The rollout engine a config names: ``native`` (``KVCacheEngine`` on the policy itself) or
    ``vllm`` (a colocated ``vllm.LLM`` fed the policy's weights; ``vllm`` is a ``VLLMConfig`` or None
    for its defaults, ``max_model_len`` the longest prompt + completion it must hold)."""
    if kind == "native":
        return KVCacheEngine(model, tokenizer, max_batch=max_batch, decode=decode, eos_token_id=eos_token_id)
    if kind == "vllm":
        v = vllm or VLLMConfig()
        if max_model_len <= 0:
            raise ValueError("the vllm engine needs max_model_len (longest prompt + completion)")
        return VLLMEngine(
            model,
            tokenizer,
            max_model_len=max_model_len,
            max_batch=max_batch,
            seed=seed,
            eos_token_id=eos_token_id,
            dtype=v.dtype,
            gpu_memory_utilization=v.gpu_memory_utilization,
            kv_cache_gb=v.kv_cache_gb,
            sleep_mode=v.sleep_mode,
            enforce_eager=v.enforce_eager,
        )
    raise ValueError(f"rollout engine: expected one of {', '.join(ENGINES)}, got {kind!r}")


__all__ = ["ENGINES", "Generation", "HFEngine", "KVCacheEngine", "RolloutEngine", "SamplingParams", "make_engine"]
