"""The config records: one typed, frozen dataclass per recipe and the records they share.

Fields carry their one-line doc in ``metadata["doc"]`` so ``posttrain <recipe> --help`` can list them.
Loading them from YAML and dotted command-line overrides, with every type and range checked, is
``posttrain.config.loading``; the package ``posttrain.config`` re-exports both. This module imports no torch.

    cfg = load_config(SFTConfig, "examples/sft_tiny.yaml", ["optim.lr=3e-4", "data.path=train.jsonl"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from posttrain.config.loading import (
    ConfigError,
    dict_doc,
    doc,
    field_help,
)
from posttrain.runtime.tracking import SINKS

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_data_file(path: str) -> bool:
    """A single data file (which has no splits), as opposed to a dataset directory, hub name or builtin task."""
    return not path.startswith("builtin:") and Path(path).suffix.lower() in DATA_FILE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Shared sub-records


@dataclass(frozen=True)
class ModelConfig:
    """`model: tiny` is shorthand for `model: {path: tiny}`."""

    path: str = doc("tiny", "local HF model directory, or a tiny preset: tiny | small | medium | base")
    arch: Literal["llama", "qwen2"] = doc("llama", "architecture of a tiny preset")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "parameter dtype")
    device: str = doc("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    tokenizer: str = doc("", "tokenizer directory (default: the model directory; tiny: built locally)")
    tokenizer_kind: Literal["char", "bpe"] = doc(
        "char", "tiny presets: character-level or BPE trained on the task text"
    )
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")

    _shorthand = "path"


@dataclass(frozen=True)
class LoraConfig:
    r: int = doc(0, "LoRA rank; 0 disables LoRA (full fine-tuning)")
    alpha: float = doc(16.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = doc(0.0, "LoRA dropout")
    target_modules: tuple[str, ...] = doc(("q_proj", "k_proj", "v_proj", "o_proj"), "module names to adapt")


@dataclass(frozen=True)
class DataConfig:
    path: str = doc("", "jsonl/json/parquet/csv file, a save_to_disk directory, a hub name, or builtin:<task>")
    split: str = doc("train", "split to read from a dataset dict / hub dataset")
    eval_path: str = doc("", "held-out file; empty: carve eval_fraction off the training data")
    eval_fraction: float = doc(0.05, "fraction held out for eval loss when eval_path is empty")
    max_length: int = doc(
        512,
        "maximum tokens per example, prompt + completion (RL recipes: a prompt may use "
        "max_length - max_completion_length)",
    )
    overlong: Literal["drop", "truncate"] = doc("drop", "what to do with rows longer than max_length (always reported)")
    shuffle: bool = doc(True, "shuffle training rows every epoch (seeded)")
    num_examples: int = doc(0, "builtin tasks: how many rows to generate (0: the task default)")

    def check(self) -> None:
        if self.split != "train" and is_data_file(self.path):
            raise ConfigError(
                f"split: {self.split!r} cannot apply to the file {self.path!r}: a single file has no "
                f"splits (they exist for dataset directories, hub datasets and builtin tasks)"
            )


def check_eval_split(data: DataConfig, train: TrainConfig) -> None:
    """A supervised recipe's ``train.eval_every`` evaluates on data.eval_path or an eval_fraction of the rows:
    asked for with neither, it would evaluate nothing, quietly."""
    if train.eval_every and not data.eval_path and data.eval_fraction <= 0:
        raise ConfigError(
            f"train.eval_every: {train.eval_every} asks for an eval loss every {train.eval_every} "
            f"steps, but data.eval_path is empty and data.eval_fraction is 0, so there is no held-out "
            f"data: set one of them, or train.eval_every: 0",
            "train.eval_every",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(0, "linear warmup steps")
    schedule: Literal["cosine", "constant", "linear"] = doc("cosine", "decay after warmup")
    min_lr_ratio: float = doc(0.1, "final lr as a fraction of the peak (cosine / linear)")
    max_grad_norm: float = doc(1.0, "gradient clipping norm; 0 disables clipping")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = doc(100, "optimizer steps")
    micro_batch_size: int = doc(8, "sequences per forward/backward")
    grad_accum: int = doc(1, "micro-batches accumulated per optimizer step")
    seed: int = doc(0, "seed for data order, init and sampling")
    output_dir: str = doc("runs/run", "run directory: config, metrics.jsonl, checkpoints, report")
    save_every: int = doc(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many step checkpoints to keep")
    eval_every: int = doc(0, "evaluate every N steps (0: only at the end)")
    log_every: int = doc(1, "print a log line every N steps")
    resume: str = doc("auto", "auto: continue from the newest complete checkpoint | never | a checkpoint path")
    report_to: tuple[str, ...] = doc((), "extra metric sinks: tensorboard, wandb, trackio")
    progress: bool = doc(True, "show a progress bar")
    threads: int = doc(
        0, "CPU threads for torch (0: auto: $POSTTRAIN_THREADS, else $OMP_NUM_THREADS, else half the available cores)"
    )
    strategy: Literal["auto", "fsdp", "replicate"] = doc(
        "auto",
        "under torchrun: fsdp (FSDP2 shards parameters, gradients, optimizer state) | replicate (full "
        "weights on every rank, DDP-style) | auto (replicate with LoRA, else fsdp)",
    )
    mixed_precision: Literal["none", "bf16"] = doc(
        "none", "under torchrun: bf16 compute with fp32 master weights and fp32 gradient reduction (FSDP2)"
    )
    cpu_offload: bool = doc(False, "under torchrun: keep parameters, gradients and optimizer state on the CPU (FSDP2)")

    def check(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("output_dir: empty (it would make the working directory the run directory)")

        for i, sink in enumerate(self.report_to):
            if sink not in SINKS:
                raise ConfigError(f"report_to[{i}]: unknown sink {sink!r} (choose from {', '.join(SINKS)})")


@dataclass(frozen=True)
class VLLMConfig:
    """The colocated vLLM rollout engine (rollout/vllm_engine.py); used when the engine is `vllm`."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc("auto", "vLLM's weight dtype (auto: the policy's)")
    gpu_memory_utilization: float = doc(0.3, "CUDA: most of the GPU's memory vLLM may take (weights, KV cache)")
    kv_cache_gb: float = doc(
        0.0, "KV cache size in GiB (0: CUDA sizes it from gpu_memory_utilization; CPU: what the batch needs)"
    )
    sleep_mode: bool = doc(True, "CUDA: release vLLM's weights and KV cache during each update")
    enforce_eager: bool = doc(
        False, "CUDA: no CUDA graphs in vLLM (faster start, slower decoding); CPU is always eager"
    )


@dataclass(frozen=True)
class EnvConfig:
    """A multi-turn environment (envs/): the policy's turns alternate with the environment's observations
    (tool results, game replies) until it is done or a budget runs out. Empty ``name``: single-turn."""

    name: str = doc(
        "",
        "environment: calculator | python | tools | guess_number (built-in) or module:Class / module:function "
        "(tools: plain typed functions; a class whose methods are tools; or an Environment); empty: single-turn",
    )
    options: dict = dict_doc("keyword options for the environment, e.g. {tools: [calculator, python]}")
    parser: Literal["auto", "hermes", "llama3_json", "code"] = doc(
        "auto",
        "tool-call format: hermes (<tool_call>{json}</tool_call>) | llama3_json | code (```python blocks) | auto "
        "(the environment's own: hermes, code for python); a module:name environment takes it in options",
    )
    max_turns: int = doc(4, "most policy turns per episode")
    turn_tokens: int = doc(0, "most new tokens per policy turn (0: max_completion_length)")
    max_tokens: int = doc(0, "most tokens after the prompt, policy's and environment's (0: data.max_length - prompt)")
    max_tool_tokens: int = doc(64, "tool output beyond this many tokens is cut (head and tail kept, a marker between)")
    tool_timeout_s: float = doc(30.0, "a step of the environment running past this is a timeout")
    on_timeout: Literal["error", "end"] = doc("error", "a timeout: a tool-error observation, or the episode ends")
    max_tool_errors: int = doc(0, "end an episode at this many tool errors (stop_reason tool_error; 0: never)")
    history: Literal["keep", "error"] = doc(
        "keep", "a chat template that rewrites earlier turns: keep the append-only context, or stop"
    )
    stop_token: str = doc(
        "auto", "the token that ends a policy turn (auto: <|im_end|> or <|eot_id|> if known, else EOS)"
    )
    workers: int = doc(8, "threads stepping environments concurrently (one trajectory's steps stay in order)")
    reuse_kv: bool = doc(True, "native engine: keep the KV cache across turns (prefill only the new tokens)")

    @property
    def enabled(self) -> bool:
        return bool(self.name)


# ---------------------------------------------------------------------------------------------
# Recipe configs


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = doc(ModelConfig(), "policy model")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off)")
    data: DataConfig = doc(DataConfig(), "training text (`text` or `messages` column)")
    optim: OptimConfig = doc(OptimConfig(lr=1e-3, warmup_steps=10), "optimizer and schedule")
    train: TrainConfig = doc(TrainConfig(), "loop, checkpoints, logging")
    packing: bool = doc(True, "pack documents into max_length rows (attention never crosses documents)")

    def check(self) -> None:
        check_eval_split(self.data, self.train)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = doc(ModelConfig(), "policy model")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off)")
    data: DataConfig = doc(DataConfig(), "prompt+completion or messages rows")
    optim: OptimConfig = doc(OptimConfig(lr=1e-4, warmup_steps=10), "optimizer and schedule")
    train: TrainConfig = doc(TrainConfig(), "loop, checkpoints, logging")
    packing: bool = doc(False, "pack examples into max_length rows (per-document positions, no cross attention)")
    completion_only: bool = doc(True, "loss only on completion / assistant tokens")

    def check(self) -> None:
        check_eval_split(self.data, self.train)


PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "kto", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
# beta when the config leaves it empty: the papers' / TRL's defaults (SimPO's beta is on a
# length-averaged log-prob, so it is ~20x larger than DPO's).
DEFAULT_PREFERENCE_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0}


@dataclass(frozen=True)
class PreferenceConfig:
    model: ModelConfig = doc(ModelConfig(), "policy model (usually an SFT checkpoint directory)")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off); the initial reference = adapters off")
    data: DataConfig = doc(DataConfig(), "prompt/chosen/rejected rows, or prompt/completion/label rows for kto")
    optim: OptimConfig = doc(OptimConfig(lr=1e-6, warmup_steps=10), "optimizer and schedule (DPO: lr ~5e-7..1e-6)")
    train: TrainConfig = doc(TrainConfig(), "loop (micro_batch_size counts pairs, or examples for kto)")
    loss: Literal["dpo", "ipo", "simpo", "kto", "orpo"] = doc("dpo", "preference objective")
    beta: Union[float, None] = doc(None, "beta (empty: dpo/ipo/kto 0.1, simpo 2.0); orpo uses orpo_lambda instead")
    label_smoothing: float = doc(0.0, "dpo only: assumed label-flip rate of conservative DPO (cDPO), in [0, 0.5)")
    rpo_alpha: float = doc(
        0.0, "dpo only: weight of an NLL term on the chosen completion (RPO, Pang et al. 2024); 0: off"
    )
    simpo_gamma: float = doc(1.0, "simpo only: target reward margin gamma in reward units (gamma/beta 0.5 at beta 2)")
    orpo_lambda: float = doc(0.1, "orpo only: weight of the odds-ratio term added to the chosen NLL")
    kto_desirable_weight: float = doc(1.0, "kto only: lambda_D, weight of desirable examples")
    kto_undesirable_weight: float = doc(1.0, "kto only: lambda_U, weight of undesirable examples")
    ref_model: str = doc("initial", "reference: initial (the starting weights) or a model directory; simpo/orpo: none")
    precompute_ref: bool = doc(
        True,
        "compute reference log-probs once before training (holds one model); false: "
        "a frozen reference model scores every batch",
    )

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE_LOSSES

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_PREFERENCE_BETA.get(self.loss, 0.0)

    def check(self) -> None:
        check_eval_split(self.data, self.train)
        defaults = PreferenceConfig()
        if self.loss == "orpo" and self.beta is not None:
            raise ConfigError("beta: orpo has no beta; its odds-ratio weight is orpo_lambda")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        # Options of another loss would be silently ignored: say so instead.
        only = {
            "label_smoothing": "dpo",
            "rpo_alpha": "dpo",
            "simpo_gamma": "simpo",
            "orpo_lambda": "orpo",
            "kto_desirable_weight": "kto",
            "kto_undesirable_weight": "kto",
        }
        for name, owner in only.items():
            if self.loss != owner and getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"{name}: only used by loss={owner}, but loss={self.loss}")
        if self.reference_free:
            if self.ref_model != "initial":
                raise ConfigError(f"ref_model: {self.loss} is reference-free and loads no reference model")
            if not self.precompute_ref:
                raise ConfigError(f"precompute_ref: {self.loss} is reference-free; there is nothing to compute")
        if not self.ref_model:
            raise ConfigError("ref_model: give 'initial' or a model directory")


@dataclass(frozen=True)
class RewardConfig:
    name: str = doc(
        "math", "verifier name (math, code, json, label, format, regex, overlong, random, ...) or module:fn"
    )
    weight: float = doc(1.0, "weight in the summed reward")
    options: dict = dict_doc("keyword options for the verifier, e.g. {timeout: 5}")

    _shorthand = "name"


ALERT_KINDS = ("collapse", "entropy", "zero_variance", "eval_decline", "flat_reward", "truncation")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """When RL's online warnings fire (posttrain.rl.diagnostics.Monitor)."""

    collapse_share: float = doc(
        0.9, "collapse: share of samples giving the batch's most common answer (prompts' golds differ)"
    )
    collapse_steps: int = doc(3, "collapse: consecutive steps at or above collapse_share")
    entropy_ratio: float = doc(0.1, "entropy: warn below this fraction of the start entropy")
    entropy_start_steps: int = doc(3, "entropy: the start value is the mean over the first steps")
    entropy_window: int = doc(10, "entropy: re-arms only when its mean over this many recent steps is clearly back")
    zero_variance_frac: float = doc(0.8, "zero_variance: share of groups with identical rewards ...")
    zero_variance_steps: int = doc(20, "zero_variance: ... for this many consecutive steps")
    eval_drops: int = doc(3, "eval_decline: held-out accuracy fell at this many evaluations in a row")
    truncation_share: float = doc(0.5, "truncation: warn when this share of completions hits the length cap ...")
    truncation_rise: float = doc(0.1, "... and the share rose by at least this much over the window ...")
    truncation_window: int = doc(20, "... of this many steps (second half's mean against the first half's)")
    flat_window: int = doc(200, "flat_reward: steps of training reward compared, first half against second half")
    flat_min_rise: float = doc(0.02, "flat_reward: warn when the mean reward rose less than this over the window")
    rearm_margin: float = doc(
        0.2,
        "a fired warning re-arms only once its measure is clearly back: past the "
        "threshold by this fraction of it (entropy above ratio x 1.2, shares below "
        "share x 0.8) ...",
    )
    rearm_steps: int = doc(3, "... for at least this many steps in a row (or as many as the warning needed to fire)")


@dataclass(frozen=True)
class RLConfig:
    """What the RL recipes (GRPO, PPO) share: the policy, its rollouts, the rewards, the clipped policy loss, the
    held-out evaluation and the online diagnostics. Each recipe adds its own fields and, where it differs, its
    own defaults."""

    model: ModelConfig = doc(ModelConfig(), "policy model (a local directory or a tiny preset)")
    lora: LoraConfig = doc(LoraConfig(), "policy LoRA adapters (r=0: off)")
    data: DataConfig = doc(DataConfig(max_length=256), "prompt rows; extra columns go to the rewards")
    optim: OptimConfig = doc(OptimConfig(lr=1e-5, max_grad_norm=1.0), "policy optimizer and schedule")
    train: TrainConfig = doc(
        TrainConfig(micro_batch_size=16),
        "loop (train.steps = rollout steps; micro_batch_size counts sequences or packed rows)",
    )
    rewards: tuple[RewardConfig, ...] = doc(
        (RewardConfig(),),
        "verifiers and/or reward models ({name: reward_model, options: {path: DIR}}) summed with "
        "weights (weight 0: logged only); the first defines accuracy",
    )
    reward_workers: int = doc(0, "worker processes for slow verifiers (0: auto)")
    reward_non_finite: Literal["error", "zero"] = doc(
        "error",
        "a reward that is inf / NaN (a verifier fault), or a row that no weighted reward applies to (all "
        "None): error stops the run naming reward, row and completion; zero scores it 0, warns and "
        "counts it (reward/non_finite)",
    )
    prompts_per_step: int = doc(8, "P: prompts (groups) per step")
    num_generations: int = doc(8, "G: completions per prompt")
    max_completion_length: int = doc(64, "max new tokens per completion")
    temperature: float = doc(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = doc(1.0, "nucleus sampling")
    rollout_decode: Literal["auto", "dynamic", "static", "cuda_graph"] = doc(
        "auto", "decode loop: auto (cuda_graph on CUDA, else dynamic) | dynamic | static | cuda_graph"
    )
    rollout_engine: Literal["native", "vllm"] = doc(
        "native",
        "rollout engine: native (KV-cache loop on the policy) | vllm (colocated vLLM, weights pushed every step)",
    )
    vllm: VLLMConfig = doc(VLLMConfig(), "vLLM engine options (rollout_engine: vllm)")
    rollout_is: Literal["none", "tis", "mis"] = doc(
        "none", "rollout/trainer mismatch correction: truncated (tis) or masked (mis) importance sampling"
    )
    rollout_is_level: Literal["token", "sequence"] = doc("token", "importance ratio per token or per sequence")
    rollout_is_cap: float = doc(2.0, "C: tis truncates the weight at C; mis zeroes ratios above C")
    rollout_is_cap_low: float = doc(0.0, "mis: also zero ratios below this")
    loss: Literal["ppo_clip", "gspo", "cispo"] = doc("ppo_clip", "policy loss")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"] = doc(
        "token_mean", "token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_sum_const (Dr. GRPO)"
    )
    eps_low: float = doc(0.2, "lower clip range (ratio >= 1 - eps_low)")
    eps_high: float = doc(0.28, "upper clip range (Clip-Higher; DAPO uses 0.28)")
    dual_clip: float = doc(0.0, "dual-clip constant c > 1 for negative advantages (0: off)")
    beta: float = doc(0.0, "KL coefficient; 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k3", "KL estimator (Schulman)")
    ref_model: str = doc("initial", "reference model: initial (the starting weights) or a checkpoint path")
    mask_truncated_completions: bool = doc(False, "truncated completions add no loss (DAPO overlong filtering)")
    padding_free: bool = doc(
        True,
        "update on packed rows (the step's sequences first-fit into rows as long as the "
        "longest): the same loss, no compute spent on padding",
    )
    eval_every: int = doc(0, "held-out greedy accuracy every N steps (needs data.eval_path; 0: at the end)")
    eval_examples: int = doc(200, "held-out rows to evaluate")
    samples_every: int = doc(10, "write sample completions to samples.jsonl every N steps")
    eval_k: int = doc(4, "held-out samples per prompt for pass@k beside greedy accuracy (0: greedy only)")
    env: EnvConfig = doc(EnvConfig(), "multi-turn environment and tools (name empty: single-turn)")
    diagnostics: DiagnosticsConfig = doc(DiagnosticsConfig(), "thresholds of the collapse / futility warnings")
    stop_on: tuple[str, ...] = doc(
        (), "warnings that stop the run: collapse, entropy, zero_variance, eval_decline, flat_reward, truncation"
    )
    keep_best: bool = doc(
        False, "export the best model by held-out accuracy as best/ beside final/ (needs data.eval_path)"
    )

    def check(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards: give at least one verifier or reward model")
        if self.dual_clip and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip: must be > 1 (or 0 for off), got {self.dual_clip}")
        if self.temperature <= 0:
            raise ConfigError("temperature: RL needs sampling, must be > 0")
        if self.data.max_length <= self.max_completion_length:
            raise ConfigError(
                f"data.max_length: {self.data.max_length} leaves no room for a prompt: it counts "
                f"prompt + completion and must exceed max_completion_length="
                f"{self.max_completion_length}"
            )
        if self.rollout_is_cap <= 0 or not 0 <= self.rollout_is_cap_low < self.rollout_is_cap:
            raise ConfigError("rollout_is_cap / rollout_is_cap_low: need 0 <= cap_low < cap")
        for kind in self.stop_on:
            if kind not in ALERT_KINDS:
                raise ConfigError(f"stop_on: unknown warning {kind!r} (choose from {', '.join(ALERT_KINDS)})")
        if (self.keep_best or "eval_decline" in self.stop_on) and not self.data.eval_path:
            raise ConfigError("keep_best / stop_on: [eval_decline] need held-out accuracy: set data.eval_path")
        if self.eval_every and not self.data.eval_path:
            raise ConfigError(
                f"eval_every: {self.eval_every} asks for held-out accuracy every {self.eval_every} "
                f"steps, but data.eval_path is empty, so there is nothing to evaluate on: set "
                f"data.eval_path (e.g. the task's test split) or eval_every: 0",
                "eval_every",
            )


@dataclass(frozen=True)
class GRPOConfig(RLConfig):
    num_iterations: int = doc(1, "mu: updates per rollout batch (1: ratio is exactly 1, no old-logp pass)")
    advantage: Literal["grpo", "rloo"] = doc("grpo", "group baseline: z-score (grpo) or leave-one-out (rloo)")
    scale: Literal["std", "none", "batch"] = doc(
        "std", "std: divide by group std; none: Dr. GRPO; batch: whiten over the batch"
    )
    kl_in: Literal["loss", "reward"] = doc("loss", "add beta * KL to the loss, or subtract it from the reward")
    dynamic_sampling: bool = doc(False, "DAPO: regenerate until P groups have non-zero reward variance")
    max_gen_batches: int = doc(4, "dynamic sampling: most generation rounds per step")

    def check(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("num_generations: a group needs at least 2 completions for a baseline")
        super().check()


@dataclass(frozen=True)
class RewardModelConfig:
    model: ModelConfig = doc(
        ModelConfig(),
        "start: a tiny preset or a causal LM directory (its backbone + a new scalar "
        "head), or a reward model directory to train further",
    )
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off); the score head always trains in full")
    data: DataConfig = doc(DataConfig(), "prompt/chosen/rejected rows, optional numeric `margin` column")
    optim: OptimConfig = doc(OptimConfig(lr=1e-4, warmup_steps=10), "optimizer and schedule")
    train: TrainConfig = doc(TrainConfig(), "loop (micro_batch_size counts pairs)")
    center_rewards_coefficient: float = doc(
        0.0, "c of the centring term c * (r_chosen + r_rejected)^2 (TRL's; 0: off, ~0.01 keeps scores near 0)"
    )
    use_margin: bool = doc(True, "subtract the data's `margin` column inside the sigmoid (Llama 2) when it has one")

    def check(self) -> None:
        check_eval_split(self.data, self.train)


@dataclass(frozen=True)
class CriticConfig:
    """`critic: reward_model` is shorthand for `critic: {init: reward_model}`."""

    init: str = doc(
        "policy",
        "where the critic starts: policy (the policy's starting backbone, value head at 0), "
        "reward_model (the first reward_model reward's weights) or a model directory",
    )
    lr: float = doc(1e-5, "critic learning rate (its own AdamW, with the policy's schedule)")
    value_clip: float = doc(
        0.2, "eps_v of the clipped value loss: V stays within V_old +- eps_v per batch (0: no clip)"
    )
    max_grad_norm: float = doc(1.0, "critic gradient clipping norm; 0 disables clipping")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "critic parameter dtype")
    warmup_steps: int = doc(
        0,
        "the first N steps update the critic only, on the initial policy's rollouts (VC-PPO's value "
        "pretraining, verl's critic_warmup); the policy does not move and its schedule starts after them",
    )
    lam: Union[float, None] = doc(
        None,
        "GAE lambda of the critic's return targets (VC-PPO's decoupled GAE: 1.0, so the terminal reward reaches "
        "early tokens undecayed); empty: the actor's lam",
    )

    _shorthand = "init"


@dataclass(frozen=True)
class PPOConfig(RLConfig):
    """PPO with a critic: RLConfig's fields with PPO's defaults (a reward model scores, four completions per
    prompt, symmetric clipping, the per-token k1 KL penalty of InstructGPT), plus the critic and GAE. The
    policy loss is aggregated as `aggregation` says over each mini-batch; the value loss is a token mean."""

    rewards: tuple[RewardConfig, ...] = doc(
        (RewardConfig(name="reward_model"),),
        "sequence score: reward models ({name: reward_model, options: {path: DIR}}) and/or verifiers, summed with "
        "weights (weight 0: logged only); the first defines accuracy",
    )
    num_generations: int = doc(4, "G: completions per prompt")
    eps_high: float = doc(0.2, "upper clip range (raise it for Clip-Higher)")
    beta: float = doc(0.05, "KL coefficient of the per-token reward -beta * KL (0: no reference model)")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k1", "per-token KL estimate in the reward (InstructGPT: k1)")
    critic: CriticConfig = doc(CriticConfig(), "the value model")
    ppo_epochs: int = doc(4, "passes over each rollout batch")
    num_mini_batches: int = doc(1, "mini-batches per pass, each one optimizer step of the policy and of the critic")
    gamma: float = doc(1.0, "GAE discount")
    lam: float = doc(0.95, "GAE lambda of the actor's advantages (and of the critic's targets unless critic.lam)")
    whiten_advantages: bool = doc(True, "whiten advantages over the rollout batch's valid tokens")
    mask_truncated_completions: bool = doc(
        False,
        "false: a completion cut at the length cap is a terminal state scored by the rewards (0, or the overlong "
        "penalty) and trained on, as in InstructGPT; true drops it from the loss (DAPO's filter, made for GRPO)",
    )

    def advice(self) -> list[str]:
        """Settings that load but are likely a mistake, said once when the run starts."""
        if not self.mask_truncated_completions:
            return []
        return [
            "mask_truncated_completions: true drops completions cut at the length cap from PPO's loss. With a "
            "critic and batch-whitened advantages every finished wrong answer is pushed down, while a "
            "truncated one gets no signal at all: running into the cap becomes the one place no negative "
            "signal reaches, and the policy learns to go there (measured: 97% of completions truncated by step "
            "100 with beta 0). DAPO's filter was made for GRPO, where an all-wrong group contributes nothing "
            "anyway; for PPO leave it false (the default)."
        ]

    def check(self) -> None:
        super().check()
        if self.critic.warmup_steps >= self.train.steps:
            raise ConfigError(
                f"critic.warmup_steps: {self.critic.warmup_steps} warmup steps leave none of train.steps="
                f"{self.train.steps} for the policy"
            )
        if self.num_mini_batches > self.prompts_per_step * self.num_generations:
            raise ConfigError(
                f"num_mini_batches: {self.num_mini_batches} mini-batches of a rollout batch of "
                f"{self.prompts_per_step * self.num_generations} sequences"
            )
        if self.critic.init == "reward_model" and not any(r.name == "reward_model" for r in self.rewards):
            raise ConfigError("critic.init: 'reward_model' needs a reward_model entry in rewards")


RECIPE_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "grpo": GRPOConfig,
    "preference": PreferenceConfig,
    "reward_model": RewardModelConfig,
    "ppo": PPOConfig,
}


def register_recipe_config(name: str, cls: type) -> None:
    RECIPE_CONFIGS[name] = cls


def recipe_help(name: str) -> str:
    """`posttrain RECIPE --help`: every field of the recipe's config with its type, default and doc."""
    cls = RECIPE_CONFIGS[name]
    rows = field_help(cls)
    width = max(len(r[0]) for r in rows)
    lines = [
        f"usage: posttrain {name} [CONFIG.yaml] [key.sub=value ...]",
        "",
        f"Fields of {cls.__name__} (override any with key.sub=value):",
        "",
    ]
    for fname, tname, default, text in rows:
        lines.append(f"  {fname:<{width}}  {text}")
        lines.append(f"  {'':<{width}}    type: {tname}; default: {default}")
    return "\n".join(lines)
