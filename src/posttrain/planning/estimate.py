"""Will it fit? Per-GPU memory of a post-training run, by component, from a model's config alone.

``estimate(shape, plan)`` is arithmetic over a typed description: a ``ModelShape`` (the numbers of a
config.json) and a ``Plan`` (recipe, GPUs, sharding, precision, LoRA, checkpointing, offload, micro-batch,
lengths). Nothing is allocated; ``posttrain plan`` reads the config and checks the parameter count on
the meta device (``posttrain.commands.plan``). Every byte count below is derived from what this code base
runs -- transformers' Llama/Qwen2 decoder layer, ``losses.logprobs`` (the chunked LM head of the RL
recipes, full logits for SFT and preference), torch's AdamW, FSDP2 -- and the derivations sit next to
the formulas. ``tests/test_planning.py`` pins them on exact numbers (parameter counts, optimizer state,
the bytes autograd saves per layer) and ``benchmarks/plan_check.py`` compares estimates with measured runs.

What the estimate is: the bytes held by tensors at the peak of each phase (what CUDA's
``max_memory_allocated`` reports). Not included, and to be kept free on a GPU (``--reserve``): the CUDA
context, NCCL buffers and the caching allocator's fragmentation.

Letters: L layers, h hidden size, I MLP size, H / Hkv attention / key-value heads, d head size, V vocab,
B rows of a micro-batch, T tokens per row, N = B*T, K loss positions (completion tokens), n GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REF_RECIPES = ("dpo", "ipo", "kto")  # preference losses with a reference
PAIR_RECIPES = ("dpo", "ipo", "simpo", "orpo")  # one forward over chosen + rejected: 2 rows per pair
RL_RECIPES = ("grpo", "ppo")
RECIPES = ("pretrain", "sft", *PAIR_RECIPES, "kto", "grpo", "ppo", "reward_model")


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Qwen2-style decoder: embedding, L x (RMSNorm, attention, RMSNorm, gated MLP), RMSNorm, head."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool  # the LM head is the embedding matrix
    qkv_bias: bool = False  # Qwen2: biases on q, k, v (not o)


def linear_dims(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {
        "q_proj": (s.hidden, q),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (q, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }


def layer_params(s: ModelShape) -> int:
    """Seven weight matrices, q/k/v biases (Qwen2), two RMSNorm weights of h."""
    bias = (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 0
    return sum(i * o for i, o in linear_dims(s).values()) + bias + 2 * s.hidden


def causal_params(s: ModelShape) -> int:
    """Embedding V*h + L layers + final norm h + an untied head V*h."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * layer_params(s) + s.hidden


def scalar_params(s: ModelShape) -> int:
    """A reward model / critic (``*ForSequenceClassification``, one label): the backbone and a bias-free
    h x 1 score head instead of the LM head."""
    return s.vocab * s.hidden + s.layers * layer_params(s) + s.hidden + s.hidden


def param_tensors(s: ModelShape, scalar: bool = False) -> int:
    """Parameter tensors (AdamW keeps one step counter per tensor): per layer 7 weights + 2 norms (+ 3
    biases); embedding, final norm, and the head unless tied (a scalar model always has its score head)."""
    per_layer = 7 + 2 + (3 if s.qkv_bias else 0)
    return s.layers * per_layer + 2 + (1 if scalar or not s.tied else 0)


def lora_params(s: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear of every layer (peft)."""
    dims = linear_dims(s)
    return s.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


@dataclass(frozen=True)
class Plan:
    """One way to run a recipe. Lengths: ``seq_len`` tokens per row (SFT / preference: max_length; RL:
    prompt + completion); ``loss_tokens`` = K per micro-batch (0: every completion at its cap)."""

    recipe: str = "grpo"
    gpus: int = 1
    strategy: Literal["replicate", "fsdp"] = "replicate"
    mixed_precision: Literal["none", "bf16"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    offload: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    micro_batch: int = 8  # rows per forward/backward on one GPU (pairs for dpo/ipo/simpo/orpo/reward_model)
    seq_len: int = 512
    completion_len: int = 64  # RL: max_completion_length
    loss_tokens: int = 0
    grad_accum: int = 0  # micro-batches per optimizer step (0: RL P*G / (n * micro_batch), else 1)
    prompts_per_step: int = 8  # RL: P (global; each GPU generates P / n groups)
    num_generations: int = 8  # RL: G
    beta: float = 0.0  # grpo / ppo: > 0 holds a reference model
    precompute_ref: bool = True  # dpo / ipo / kto
    device: Literal["cuda", "cpu"] = "cuda"

    def check(self) -> None:
        if self.recipe not in RECIPES:
            raise PlanError(f"recipe {self.recipe!r}: expected one of {', '.join(RECIPES)}")
        if self.offload and self.strategy != "fsdp":
            raise PlanError("offload: CPU offload is FSDP2's (CPUOffloadPolicy); it needs strategy fsdp")
        if min(self.gpus, self.micro_batch, self.seq_len) < 1:
            raise PlanError("gpus, micro-batch and sequence length must be >= 1")
        bad = [t for t in self.lora_targets if t not in LINEARS]
        if self.lora_r and bad:
            raise PlanError(f"lora targets {bad}: expected some of {', '.join(LINEARS)}")


@dataclass(frozen=True)
class Part:
    """One component on one GPU. ``phase``: when it is held -- always, or only in that phase."""

    name: str
    bytes: int
    phase: str
    how: str


@dataclass(frozen=True)
class Estimate:
    parts: tuple[Part, ...]
    phases: dict[str, int]  # per-GPU bytes at the peak of each phase (the always-held parts included)
    host_bytes: int  # CPU memory per GPU process for offloaded state

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def total(self, phase: str = "always") -> int:
        return sum(p.bytes for p in self.parts if p.phase == phase)

    def get(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for backward, tensor by tensor (tests/test_planning.py checks these
# sums against torch.autograd.graph.saved_tensors_hooks on real layers, byte for byte).


@dataclass(frozen=True)
class Act:
    """How a forward runs: activation bytes ``b`` (the compute dtype), which weights train, masks."""

    b: int
    full: bool  # every weight trains (else: frozen base, LoRA adapters on ``targets``)
    targets: tuple[str, ...] = ()
    lora_r: int = 0
    masked: bool = True  # a padding / packing mask reaches attention (always, for RL's packed rows)


def _norm_saved(N: int, h: int, a: Act, out_saved: bool) -> int:
    """transformers' RMSNorm: x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps); w * that.to(dtype).
    Saved: x32 (pow and mul need it: the fp32 copy, or x itself in fp32) 4Nh, rsqrt 4N, the normalized
    h in the activation dtype bNh when w trains (the weight's gradient needs it), and the output bNh when
    a consumer saves its input (a trained or adapted linear)."""
    return 4 * N * h + 4 * N + (a.b * N * h if a.full else 0) + (a.b * N * h if out_saved else 0)


def _adapter_input(N: int, width: int, a: Act, copies: int) -> int:
    """LoRA A saves its input; peft casts it to the adapter dtype (fp32) first, one copy per adapted
    module, so a bf16 model saves fp32 copies and an fp32 model saves the input it already has (0 extra)."""
    return copies * 4 * N * width if a.b != 4 else 0


def layer_saved(s: ModelShape, B: int, T: int, a: Act) -> int:
    """Bytes one decoder layer saves for backward (its input is saved by its first norm: x32)."""
    N, h, I, d = B * T, s.hidden, s.intermediate, s.head_dim  # noqa: E741 - I is the MLP size, as in the letters above
    t = set(a.targets) if not a.full else set(LINEARS)
    qkv_adapted = [m for m in ("q_proj", "k_proj", "v_proj") if m in t]
    # A norm's output is saved by a trained linear, or by an adapter that reads it uncast (fp32 model).
    total = _norm_saved(N, h, a, out_saved=a.full or (bool(qkv_adapted) and a.b == 4))
    total += _adapter_input(N, h, a, len(qkv_adapted)) if not a.full else 0
    # Attention: q and k after RoPE and v, as sdpa saves them. With a mask transformers repeats k, v to
    # H heads (repeat_kv: no GQA kernel with a mask); without one k, v keep Hkv heads. sdpa also saves
    # its output (also o_proj's input: the same storage), the fp32 log-sum-exp (B, H, T), and the
    # boolean mask as an additive (B, 1, T, T) bias in the activation dtype, per layer.
    kv_heads = s.heads if a.masked else s.kv_heads
    total += a.b * N * d * (2 * s.heads + 2 * kv_heads) + 4 * N * s.heads
    total += a.b * B * T * T if a.masked else 0
    total += _adapter_input(N, s.heads * d, a, 1) if not a.full and "o_proj" in t else 0
    # Second norm; its output is saved when gate/up train or are adapted.
    mlp_in = a.full or (("gate_proj" in t or "up_proj" in t) and a.b == 4)
    total += _norm_saved(N, h, a, out_saved=mlp_in)
    total += _adapter_input(N, h, a, ("gate_proj" in t) + ("up_proj" in t)) if not a.full else 0
    # MLP down(silu(gate) * up): silu saves gate, the product saves silu(gate) and up, down_proj saves
    # the product when it trains or is adapted.
    total += 3 * a.b * N * I + (a.b * N * I if a.full or ("down_proj" in t and a.b == 4) else 0)
    total += _adapter_input(N, I, a, 1) if not a.full and "down_proj" in t else 0
    # LoRA B saves A's output (r wide, fp32) for each adapted module.
    if not a.full:
        total += 4 * N * a.lora_r * len(t)
    return total


def model_saved(s: ModelShape, B: int, T: int, a: Act, checkpointing: bool) -> int:
    """Saved bytes of the decoder stack (no head): L layers (with checkpointing: each layer's input
    only, bNh, plus one layer recomputed in backward), the final norm's x32 and rsqrt (its output goes to
    the head), the RoPE cos/sin pair (B, T, d) for per-row positions, the token ids (int64) for the
    embedding's gradient. With a frozen embedding (LoRA) the first layer's input needs no gradient: its
    first norm saves nothing and the ids are not kept."""
    N = B * T
    layers = (
        s.layers * a.b * N * s.hidden + layer_saved(s, B, T, a) if checkpointing else s.layers * layer_saved(s, B, T, a)
    )
    final = 4 * N * s.hidden + 4 * N + (a.b * N * s.hidden if a.full else 0)
    frozen_input = 0 if a.full or checkpointing else 4 * N * s.hidden + 4 * N
    return layers + final + 2 * a.b * N * s.head_dim + (8 * N if a.full else 0) - frozen_input


def logits_tile_rows(s: ModelShape, device: str) -> int:
    """``losses.logprobs.completion_logps``: tiles of 2^22 (CPU) or 2^28 (CUDA) fp32 logits."""
    return max(1, (1 << (22 if device == "cpu" else 28)) // s.vocab)


def head_saved(s: ModelShape, B: int, T: int, K: int, a: Act, head: str) -> int:
    """chunked (RL policy): the K selected hidden rows bKh, fp32 log-sum-exps 4K and int64 targets 8K
    (``_HeadLogps``), the boolean selection mask BT (its index); logits never saved.
    full (SFT, preference): the head's input bNh, fp32 logits 4NV (``token_logps``' log-sum-exp keeps
    its fp32 input; a bf16 model's logits are copied to fp32 row by row), the log-sum-exps 4N and the
    gathered int64 targets 8N. scalar (critic, reward model):
    the score head's input bNh."""
    N = B * T
    if head == "chunked":
        return a.b * K * s.hidden + 12 * K + N
    if head == "full":
        return a.b * N * s.hidden + 4 * N * s.vocab + 12 * N
    return a.b * N * s.hidden


def head_backward(s: ModelShape, B: int, T: int, K: int, a: Act, head: str, device: str, trains_head: bool) -> int:
    """Transient bytes at the start of backward, in the head. chunked (``_HeadLogps.backward``): three
    fp32 tiles of min(K, tile) x V (logits z, exp(z - lse), the gradient), the gradient of the K hidden
    rows, and when the head trains its fp32 V x h weight-gradient accumulator plus each tile's fp32
    g^T h product before it is added in (the accumulator becomes the head's .grad). full (``token_logps``
    row by row): the rows' logits gradients, (N, V) in the activation dtype, gathered while the saved
    logits are still held, and two fp32 (T, V) row temporaries; the head's own weight gradient comes
    after the logits are freed."""
    if head == "chunked":
        acc = 2 * 4 * s.vocab * s.hidden if trains_head else 0
        return 3 * 4 * min(K, logits_tile_rows(s, device)) * s.vocab + a.b * K * s.hidden + acc
    if head == "full":
        return a.b * B * T * s.vocab + 2 * 4 * T * s.vocab
    return 0


def layer_backward(s: ModelShape, B: int, T: int, a: Act) -> int:
    """Transient bytes inside one layer's backward beyond what its nodes free. The MLP's is the largest:
    down_proj's backward makes the (N, I) gradient of the product, then the product's backward makes the
    gradients of silu(gate) and up (2 x (N, I)) before the first is released: 3 bNI at once, less the
    product itself when down_proj had saved it (it trains, or is adapted) and has freed it by then. Plus
    the residual stream's gradient and its copy (2 bNh)."""
    N = B * T
    prod_saved = a.full or "down_proj" in a.targets
    return a.b * N * ((3 - prod_saved) * s.intermediate + 2 * s.hidden)


def forward_transient(s: ModelShape, B: int, T: int, K: int, a: Act, head: str, device: str) -> int:
    """Peak of a forward without gradient (reference / old log-probs, critic values, reward scores,
    DPO's precomputed reference): one layer at a time -- residual and hidden (2 bNh), q/k/v (3 bNHd with
    a mask), the additive mask bBT^2, gate/up/product (3 bNI) -- plus the head: two fp32 tiles (chunked),
    or the logits in the activation dtype and their fp32 copy (full)."""
    N = B * T
    layer = a.b * N * (2 * s.hidden + 3 * s.heads * s.head_dim + 3 * s.intermediate) + a.b * B * T * T
    if head == "chunked":
        return layer + 2 * 4 * min(K, logits_tile_rows(s, device)) * s.vocab
    if head == "full":
        return layer + (a.b + 4) * N * s.vocab
    return layer


def kv_cache(s: ModelShape, rows: int, length: int, b: int) -> int:
    """Keys and values of every layer for every row: 2 x L x Hkv x d x b per token (the KV-cache engine
    keeps prompt + completion per row; worst case: no row stops early)."""
    return 2 * s.layers * s.kv_heads * s.head_dim * b * rows * length


# ---------------------------------------------------------------------------------------------
# The estimate


def _bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def held_models(plan: Plan) -> dict[str, bool]:
    """Which models a recipe holds besides the policy (posttrain's recipes): a frozen reference (GRPO /
    PPO with beta > 0, DPO/IPO/KTO without precompute_ref -- none with LoRA: the adapters switched off
    are the reference), PPO's critic (trained in full, even when the policy has LoRA) and reward model."""
    lora = plan.lora_r > 0
    ref = (plan.recipe in RL_RECIPES and plan.beta > 0) or (plan.recipe in REF_RECIPES and not plan.precompute_ref)
    return {"reference": ref and not lora, "critic": plan.recipe == "ppo", "reward model": plan.recipe == "ppo"}


def _rows_and_tokens(plan: Plan) -> tuple[int, int, int]:
    """(rows B, tokens per row T, loss positions K) of one micro-batch's forward. Pair recipes run
    chosen and rejected in one forward (2 rows per pair); RL rows hold prompt + completion, with K the
    completion tokens (every completion at its cap unless ``loss_tokens`` says otherwise)."""
    B = plan.micro_batch * (2 if plan.recipe in PAIR_RECIPES or plan.recipe == "reward_model" else 1)
    K = plan.loss_tokens or B * min(plan.completion_len, plan.seq_len)
    return B, plan.seq_len, K


def _policy_parts(s: ModelShape, plan: Plan, add) -> tuple[float, float, int, float]:
    """The trained model's weights, gradients and AdamW state (``add``ed): (its parameters, the trainable
    ones, their bytes each, host bytes under offload)."""
    n, off, lora, fsdp = plan.gpus, plan.offload, plan.lora_r > 0, plan.strategy == "fsdp"
    shard, b_store = (n if fsdp else 1), _bytes(plan.dtype)
    where = "on the CPU (offload)" if off else (f"sharded over {n} GPUs" if fsdp else "replicated")
    scalar = plan.recipe == "reward_model"  # the model trained is a scalar-head one (no LM head)
    P = scalar_params(s) if scalar else causal_params(s)
    # Trainable parameters: every weight, or the adapters (peft keeps them fp32 whatever the base dtype;
    # a reward model's score head also trains in full then, a negligible h x 1).
    if lora:
        T_params, b_train = lora_params(s, plan.lora_r, plan.lora_targets), 4
        T_tensors = s.layers * 2 * len(plan.lora_targets)
    else:
        T_params, T_tensors, b_train = P, param_tensors(s, scalar), b_store
    adapters = T_params * b_train if lora else 0
    add(
        "policy weights",
        0 if off else (P * b_store + adapters) / shard,
        "always",
        f"{P / 1e9:.3g}B x {b_store} B ({plan.dtype})" + (" + fp32 adapters" if lora else "") + f", {where}",
    )
    what = f"LoRA r={plan.lora_r} adapters (fp32)" if lora else "every weight"
    # Gradients: one per trainable parameter, in its dtype (FSDP2 reduce-scatters into the sharded
    # parameter's dtype, in fp32 with mixed precision); sharded by n under FSDP.
    add(
        "gradients",
        0 if off else T_params * b_train / shard,
        "train",
        f"{T_params / 1e6:.4g}M trainable ({what}) x {b_train} B, {where}",
    )
    # AdamW: exp_avg and exp_avg_sq like the parameter (zeros_like: its dtype) + a 4-byte step per tensor.
    opt = 2 * T_params * b_train / shard + 4 * T_tensors
    add(
        "optimizer state",
        0 if off else opt,
        "always",
        f"AdamW: 2 x {T_params / 1e6:.4g}M x {b_train} B + steps, {where}",
    )
    host = (P * b_store + adapters + T_params * b_train + 2 * T_params * b_train) / shard if off else 0
    return P, T_params, b_train, host


def _fsdp_transients(s: ModelShape, plan: Plan, P: float, add) -> tuple[float, float]:
    """What FSDP (or bf16 compute over stored fp32 weights) gathers during a step (``add``ed): (gathered
    parameters, unsharded layer gradients)."""
    fsdp, lora, b_store = plan.strategy == "fsdp", plan.lora_r > 0, _bytes(plan.dtype)
    b_act = 2 if plan.mixed_precision == "bf16" else b_store
    # Under FSDP each layer's parameters are all-gathered (in the compute dtype) around its forward and
    # backward, the next one prefetched: 2 layers; the root (embedding, final norm, head) stays gathered
    # through forward and backward. Its unsharded gradients exist for one layer before the reduce-scatter
    # (and an fp32 copy for the fp32 reduction under bf16 mixed precision).
    root = P - s.layers * layer_params(s)
    gathered = (
        (2 * layer_params(s) + root) * b_act
        if fsdp
        else ((2 * layer_params(s) + root) * b_act if plan.mixed_precision == "bf16" and b_store != b_act else 0)
    )
    layer_grad = layer_params(s) if not lora else lora_params(s, plan.lora_r, plan.lora_targets) / s.layers
    unsharded_grads = layer_grad * (b_act + (4 if plan.mixed_precision == "bf16" else 0)) if fsdp else 0
    if gathered:
        add("gathered parameters", gathered, "train", "two layers + embedding/head, in the compute dtype (all-gather)")
    if unsharded_grads:
        add("unsharded layer gradients", unsharded_grads, "train", "one layer's, before its reduce-scatter")
    return gathered, unsharded_grads


def _other_models(
    s: ModelShape, plan: Plan, held: dict[str, bool], reward: ModelShape, add, B: int, T: int, K: int, masked: bool
) -> tuple[float, float]:
    """The models besides the policy (``add``s their parts): (the critic's saved activations, host bytes
    they keep under offload)."""
    n, off, fsdp = plan.gpus, plan.offload, plan.strategy == "fsdp"
    shard, b_store = (n if fsdp else 1), _bytes(plan.dtype)
    b_act = 2 if plan.mixed_precision == "bf16" else b_store
    where = "on the CPU (offload)" if off else (f"sharded over {n} GPUs" if fsdp else "replicated")
    P = causal_params(s)
    # Critic (PPO): a second full model with a scalar head, trained in full with its own AdamW, same
    # strategy; its activations join the policy's in the one backward of the PPO step.
    critic_saved = host = 0
    if held["critic"]:
        Pc = scalar_params(s)
        add("critic weights", 0 if off else Pc * b_store / shard, "always", f"{Pc / 1e9:.3g}B x {b_store} B, {where}")
        add(
            "critic optimizer state",
            0 if off else 2 * Pc * b_store / shard + 4 * param_tensors(s, True),
            "always",
            "AdamW over every critic weight (the critic trains in full)",
        )
        add("critic gradients", 0 if off else Pc * b_store / shard, "train", f"{Pc / 1e9:.3g}B x {b_store} B, {where}")
        critic_act = Act(b_act, full=True, masked=masked)
        critic_saved = model_saved(s, B, T, critic_act, plan.gradient_checkpointing) + head_saved(
            s, B, T, K, critic_act, "scalar"
        )
        host += (Pc * b_store * 4) / shard if off else 0
    if held["reference"]:
        add("reference weights", 0 if off else P * b_store / shard, "always", f"frozen copy of the policy, {where}")
        host += P * b_store / shard if off else 0
    if held["reward model"]:
        # Frozen and replicated on every GPU, in the compute dtype: nothing updates it, so it needs no fp32
        # copy (the reward_model verifier's own ``dtype`` option; bfloat16 under mixed precision).
        Pr = scalar_params(reward)
        add(
            "reward model weights",
            Pr * b_act,
            "always",
            f"{Pr / 1e9:.3g}B x {b_act} B, frozen, replicated on every GPU",
        )
    return critic_saved, host


def _rollout(s: ModelShape, plan: Plan, P: float, b_act: int, add) -> float:
    """RL's rollout phase beyond the always-held parts (``add``s its parts)."""
    # Rollout: each GPU samples its share of the P x G completions with a KV cache; token-by-token
    # decoding cannot gather one layer per token, so FSDP unshards the whole policy (compute dtype) on
    # every GPU for the rollout, beside its shards.
    rows = max(1, math.ceil(plan.prompts_per_step / plan.gpus)) * plan.num_generations
    rows = min(rows, max(1, 256 // plan.num_generations) * plan.num_generations)  # the engine's max_batch
    kv = kv_cache(s, rows, plan.seq_len, b_act)
    add(
        "rollout KV cache",
        kv,
        "rollout",
        f"{rows} rows x {plan.seq_len} tokens x 2 x {s.layers} layers x "
        f"{s.kv_heads} kv heads x {s.head_dim} x {b_act} B",
    )
    unshard = P * b_act if plan.strategy == "fsdp" else 0
    if unshard:
        add("unsharded policy (rollout)", unshard, "rollout", f"{P / 1e9:.3g}B x {b_act} B on every GPU")
    # Decoding: the cache grows by concatenation (one layer's cache copied at a time) and each step
    # samples from fp32 logits (logits, probabilities, sorted copy: 3 x rows x V x 4).
    decode = kv / s.layers + 3 * 4 * rows * s.vocab
    add("decode temporaries", decode, "rollout", "one layer's cache copy + fp32 sampling buffers")
    return unshard + kv + decode


def estimate(shape: ModelShape, plan: Plan, reward: ModelShape | None = None) -> Estimate:
    """Per-GPU bytes by component and per phase for ``plan``; ``reward`` is PPO's reward-model shape
    (default: the policy's)."""
    plan.check()
    s, n = shape, plan.gpus
    fsdp, off, lora = plan.strategy == "fsdp", plan.offload, plan.lora_r > 0
    shard = n if fsdp else 1
    b_store = _bytes(plan.dtype)
    b_act = 2 if plan.mixed_precision == "bf16" else b_store
    held = held_models(plan)
    parts: list[Part] = []

    def add(name: str, nbytes: float, phase: str, how: str) -> None:
        parts.append(Part(name, int(math.ceil(nbytes)), phase, how))

    P, T_params, b_train, host = _policy_parts(s, plan, add)

    B, T, K = _rows_and_tokens(plan)
    masked = True  # right padding or packed rows: attention always gets a mask in these recipes
    act = Act(b_act, full=not lora, targets=plan.lora_targets if lora else (), lora_r=plan.lora_r, masked=masked)
    head = "chunked" if plan.recipe in RL_RECIPES else ("scalar" if plan.recipe == "reward_model" else "full")
    saved = model_saved(s, B, T, act, plan.gradient_checkpointing) + head_saved(s, B, T, K, act, head)
    trains_head = not lora
    t_head = head_backward(s, B, T, K, act, head, plan.device, trains_head)
    t_layer = layer_backward(s, B, T, act)
    gathered, unsharded_grads = _fsdp_transients(s, plan, P, add)

    critic_saved, host_other = _other_models(s, plan, held, reward or s, add, B, T, K, masked)
    host += host_other

    # Activations of one micro-batch, and the backward sweep. Backward starts at the head with every
    # activation saved; then layer by layer (top first) it frees a layer's activations and allocates that
    # layer's gradients. With uniform layers the peak is at one of three moments: the head's backward
    # (all activations + its transients), the top layer's (the head's saved tensors gone, its weight
    # gradient there, + one layer's transients), the last layer's (every gradient + one layer's
    # activations and transients). With several micro-batches per step, the gradients of the earlier
    # ones are all there already.
    acts = saved + critic_saved
    add(
        "activations",
        acts,
        "train",
        f"saved for backward: {B} rows x {T} tokens"
        + (" (gradient checkpointing: layer inputs + one layer)" if plan.gradient_checkpointing else ""),
    )
    add(
        "head / logits (transient)",
        t_head,
        "train",
        {"chunked": "fp32 logits tiles + head-gradient buffers", "full": "(N, V) logits gradient", "scalar": "-"}[head],
    )
    grads = sum(p.bytes for p in parts if p.name in ("gradients", "critic gradients"))
    # RL: each GPU updates on its P*G/n sequences in micro-batches of ``micro_batch`` rows.
    accum = plan.grad_accum or (
        math.ceil(plan.prompts_per_step * plan.num_generations / n / plan.micro_batch)
        if plan.recipe in RL_RECIPES
        else 1
    )
    critic = held["critic"]
    heads = head_saved(s, B, T, K, act, head) + (head_saved(s, B, T, K, act, "scalar") if critic else 0)
    head_grad = s.vocab * s.hidden * b_train / shard if trains_head and not off else 0
    layer_act = layer_saved(s, B, T, act) + (layer_saved(s, B, T, Act(b_act, full=True)) if critic else 0)
    if accum > 1:
        backward = grads + max(acts + t_head, acts - heads + t_layer)
    else:
        backward = max(acts + t_head, acts - heads + head_grad + t_layer, grads + layer_act + t_layer)
    # Preference losses with a live reference (no precompute) score it after the policy's forward, with
    # the policy's activations saved: its no-grad forward runs on top of them.
    live_ref = plan.recipe in REF_RECIPES and not plan.precompute_ref
    ref_on_top = acts + forward_transient(s, B, T, K, act, head, plan.device) if live_ref else 0
    always = sum(p.bytes for p in parts if p.phase == "always")
    phases = {"train": always + gathered + unsharded_grads + max(backward, ref_on_top)}
    # Optimizer step: every gradient + AdamW's temporaries -- CUDA's foreach implementation allocates a
    # sqrt(exp_avg_sq) list as large as one moment; CPU's per-tensor loop, one for the largest tensor.
    if not off:
        largest = (
            max(s.vocab * s.hidden, s.hidden * s.intermediate) * b_train
            if not lora
            else max(plan.lora_r * max(linear_dims(s)[t]) for t in plan.lora_targets) * 4
        )
        adam_tmp = T_params * b_train / shard if plan.device == "cuda" else largest
        add("optimizer-step temporaries", adam_tmp, "step", "foreach sqrt(v) (CUDA) / largest tensor (CPU)")
        phases["step"] = always + grads + adam_tmp

    # Forwards without gradient (reference / old log-probs, critic values, DPO's precompute, reward scores).
    fwd = forward_transient(s, B, T, K, act, head, plan.device)
    add("no-grad forward (transient)", fwd, "score", "one layer's intermediates + head")
    phases["score"] = always + gathered + fwd

    if plan.recipe in RL_RECIPES:
        phases["rollout"] = always + _rollout(s, plan, P, b_act, add)
    return Estimate(tuple(parts), phases, int(host))


# ---------------------------------------------------------------------------------------------
# The cheapest configuration that fits

# "Cheapest" = the least throughput cost: relative step-time factors against the plain configuration
# (replicated, no checkpointing, no offload, the micro-batch asked for). They only order the options;
# they are rough, not a prediction of speed:
#   fsdp          x1.10  parameters all-gathered in forward and backward, gradients reduce-scattered: 1.5x the
#                        bytes of DDP's all-reduce, mostly overlapped with compute
#   checkpointing x4/3   one more forward per backward (forward : backward ~ 1 : 2 in FLOPs)
#   offload       x3     parameters and gradients cross PCIe every step and AdamW runs on the CPU (users of
#                        FSDP / ZeRO offload report 2-5x)
#   micro-batch   x1.05 per halving: the same tokens in more, smaller kernels
# LoRA is not searched against full fine-tuning on speed: it trains something else (a low-rank update),
# so ``search`` keeps ``plan.lora_r`` and the CLI reports the LoRA alternative beside.
COST = {"fsdp": 1.10, "checkpointing": 4 / 3, "offload": 3.0, "halving": 1.05}


def throughput_cost(plan: Plan, asked_micro_batch: int) -> float:
    c = 1.0
    if plan.strategy == "fsdp" and plan.gpus > 1:
        c *= COST["fsdp"]
    if plan.gradient_checkpointing:
        c *= COST["checkpointing"]
    if plan.offload:
        c *= COST["offload"]
    return c * COST["halving"] ** math.log2(asked_micro_batch / plan.micro_batch)


@dataclass(frozen=True)
class Option:
    plan: Plan
    estimate: Estimate
    cost: float
    fits: bool


def search(
    shape: ModelShape, plan: Plan, capacity: int, reward: ModelShape | None = None, cpu_memory: int = 0
) -> list[Option]:
    """Every combination of strategy (replicate, fsdp, fsdp + CPU offload), gradient checkpointing and
    micro-batch (halved down to 1) for ``plan``'s model, recipe and LoRA setting, ranked: fitting first
    (peak <= ``capacity`` per GPU and, when ``cpu_memory`` is given, the offloaded state of all GPUs
    within it), then by ``throughput_cost``, then by peak."""
    strategies = ("replicate", "fsdp") if plan.gpus > 1 else ("replicate",)
    mbs = [plan.micro_batch]
    while mbs[-1] > 1:
        mbs.append(mbs[-1] // 2)
    options = []
    for strategy in (*strategies, "fsdp+offload"):
        for ckpt in (False, True):
            for mb in mbs:
                p = replace(
                    plan,
                    strategy="fsdp" if strategy != "replicate" else "replicate",
                    offload=strategy == "fsdp+offload",
                    gradient_checkpointing=ckpt,
                    micro_batch=mb,
                )
                e = estimate(shape, p, reward)
                fits = e.peak <= capacity and (not cpu_memory or e.host_bytes * p.gpus <= cpu_memory)
                options.append(Option(p, e, throughput_cost(p, plan.micro_batch), fits))
    return sorted(options, key=lambda o: (not o.fits, o.cost, o.estimate.peak))
