"""Typed, frozen config records, YAML loading and dotted command-line overrides.

Every recipe has one config dataclass. Fields carry their one-line doc in ``metadata["doc"]`` so
``posttrain <recipe> --help`` can list them. This module imports no torch.

    cfg = load_config(SFTConfig, "examples/sft_tiny.yaml", ["optim.lr=3e-4", "data.path=train.jsonl"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the field (and the file) at fault."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line doc shown by ``--help``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a factory for mutable defaults")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def dict_doc(text: str) -> Any:
    return field(default_factory=dict, metadata={"doc": text})


# ---------------------------------------------------------------------------------------------
# Shared sub-records


@dataclass(frozen=True)
class ModelConfig:
    """`model: tiny` is shorthand for `model: {path: tiny}`."""

    path: str = doc("tiny", "local HF model directory, or a tiny preset: tiny | small | medium")
    arch: Literal["llama", "qwen2"] = doc("llama", "architecture of a tiny preset")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "parameter dtype")
    device: str = doc("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    tokenizer: str = doc("", "tokenizer directory (default: the model directory; tiny: built locally)")
    tokenizer_kind: Literal["char", "bpe"] = doc("char", "tiny presets: character-level or BPE trained on the task text")
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
    max_length: int = doc(512, "maximum tokens per example (prompt + completion)")
    overlong: Literal["drop", "truncate"] = doc("drop", "what to do with rows longer than max_length (always reported)")
    shuffle: bool = doc(True, "shuffle training rows every epoch (seeded)")
    num_examples: int = doc(0, "builtin tasks: how many rows to generate (0: the task default)")


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


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = doc(ModelConfig(), "policy model")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off)")
    data: DataConfig = doc(DataConfig(), "prompt+completion or messages rows")
    optim: OptimConfig = doc(OptimConfig(lr=1e-4, warmup_steps=10), "optimizer and schedule")
    train: TrainConfig = doc(TrainConfig(), "loop, checkpoints, logging")
    packing: bool = doc(False, "pack examples into max_length rows (per-document positions, no cross attention)")
    completion_only: bool = doc(True, "loss only on completion / assistant tokens")


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
    rpo_alpha: float = doc(0.0, "dpo only: weight of an NLL term on the chosen completion (RPO, Pang et al. 2024); 0: off")
    simpo_gamma: float = doc(1.0, "simpo only: target reward margin gamma in reward units (gamma/beta 0.5 at beta 2)")
    orpo_lambda: float = doc(0.1, "orpo only: weight of the odds-ratio term added to the chosen NLL")
    kto_desirable_weight: float = doc(1.0, "kto only: lambda_D, weight of desirable examples")
    kto_undesirable_weight: float = doc(1.0, "kto only: lambda_U, weight of undesirable examples")
    ref_model: str = doc("initial", "reference: initial (the starting weights) or a model directory; simpo/orpo: none")
    precompute_ref: bool = doc(True, "compute reference log-probs once before training (holds one model); false: "
                                     "a frozen reference model scores every batch")

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE_LOSSES

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_PREFERENCE_BETA.get(self.loss, 0.0)

    def check(self) -> None:
        defaults = PreferenceConfig()
        if self.loss == "orpo" and self.beta is not None:
            raise ConfigError("beta: orpo has no beta; its odds-ratio weight is orpo_lambda")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        # Options of another loss would be silently ignored: say so instead.
        only = {"label_smoothing": "dpo", "rpo_alpha": "dpo", "simpo_gamma": "simpo", "orpo_lambda": "orpo",
                "kto_desirable_weight": "kto", "kto_undesirable_weight": "kto"}
        for name, owner in only.items():
            if self.loss != owner and getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"{name}: only used by loss={owner}, but loss={self.loss}")
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.simpo_gamma < 0 or self.orpo_lambda < 0 or self.rpo_alpha < 0:
            raise ConfigError("simpo_gamma / orpo_lambda / rpo_alpha: must be >= 0")
        if self.reference_free:
            if self.ref_model != "initial":
                raise ConfigError(f"ref_model: {self.loss} is reference-free and loads no reference model")
            if not self.precompute_ref:
                raise ConfigError(f"precompute_ref: {self.loss} is reference-free; there is nothing to compute")
        if not self.ref_model:
            raise ConfigError("ref_model: give 'initial' or a model directory")


@dataclass(frozen=True)
class RewardConfig:
    name: str = doc("math", "verifier name (math, code, json, label, format, regex, overlong, random, ...) or module:fn")
    weight: float = doc(1.0, "weight in the summed reward")
    options: dict = dict_doc("keyword options for the verifier, e.g. {timeout: 5}")

    _shorthand = "name"


ALERT_KINDS = ("collapse", "entropy", "zero_variance", "eval_decline")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """When RL's online warnings fire (posttrain.rl.diagnostics.Monitor)."""

    collapse_share: float = doc(0.9, "collapse: share of samples giving the batch's most common answer (prompts' golds differ)")
    collapse_steps: int = doc(3, "collapse: consecutive steps at or above collapse_share")
    entropy_ratio: float = doc(0.1, "entropy: warn below this fraction of the start entropy")
    entropy_start_steps: int = doc(3, "entropy: the start value is the mean over the first steps")
    zero_variance_frac: float = doc(0.8, "zero_variance: share of groups with identical rewards ...")
    zero_variance_steps: int = doc(20, "zero_variance: ... for this many consecutive steps")
    eval_drops: int = doc(3, "eval_decline: held-out accuracy fell at this many evaluations in a row")


@dataclass(frozen=True)
class GRPOConfig:
    model: ModelConfig = doc(ModelConfig(), "policy model (a local directory or a tiny preset)")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapters (r=0: off)")
    data: DataConfig = doc(DataConfig(max_length=256), "prompt rows; extra columns go to the rewards")
    optim: OptimConfig = doc(OptimConfig(lr=1e-5, max_grad_norm=1.0), "optimizer and schedule")
    train: TrainConfig = doc(TrainConfig(micro_batch_size=16),
                             "loop (train.steps = rollout steps; padding_free: micro_batch_size counts packed rows)")
    rewards: tuple[RewardConfig, ...] = doc((RewardConfig(),), "verifiers summed with weights; the first defines accuracy")
    reward_workers: int = doc(0, "worker processes for slow verifiers (0: auto)")
    prompts_per_step: int = doc(8, "P: prompt groups per step")
    num_generations: int = doc(8, "G: completions per prompt")
    max_completion_length: int = doc(64, "max new tokens per completion")
    temperature: float = doc(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = doc(1.0, "nucleus sampling")
    rollout_decode: Literal["auto", "dynamic", "static", "cuda_graph"] = doc(
        "auto", "decode loop: auto (cuda_graph on CUDA, else dynamic) | dynamic | static | cuda_graph")
    num_iterations: int = doc(1, "mu: updates per rollout batch (1: ratio is exactly 1, no old-logp pass)")
    advantage: Literal["grpo", "rloo"] = doc("grpo", "group baseline: z-score (grpo) or leave-one-out (rloo)")
    scale: Literal["std", "none", "batch"] = doc("std", "std: divide by group std; none: Dr. GRPO; batch: whiten over the batch")
    loss: Literal["ppo_clip", "gspo", "cispo"] = doc("ppo_clip", "policy loss")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"] = doc(
        "token_mean", "token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_sum_const (Dr. GRPO)")
    eps_low: float = doc(0.2, "lower clip range (ratio >= 1 - eps_low)")
    eps_high: float = doc(0.28, "upper clip range (Clip-Higher; DAPO uses 0.28)")
    dual_clip: float = doc(0.0, "dual-clip constant c > 1 for negative advantages (0: off)")
    beta: float = doc(0.0, "KL coefficient; 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k3", "KL estimator (Schulman)")
    kl_in: Literal["loss", "reward"] = doc("loss", "add beta * KL to the loss, or subtract it from the reward")
    ref_model: str = doc("initial", "reference model: initial (the starting weights) or a checkpoint path")
    dynamic_sampling: bool = doc(False, "DAPO: regenerate until P groups have non-zero reward variance")
    max_gen_batches: int = doc(4, "dynamic sampling: most generation rounds per step")
    mask_truncated_completions: bool = doc(False, "truncated completions add no loss (DAPO overlong filtering)")
    padding_free: bool = doc(True, "update on packed rows (the step's sequences first-fit into rows as long as the "
                                   "longest): the same loss, no compute spent on padding")
    eval_every: int = doc(0, "held-out greedy accuracy every N steps (needs data.eval_path; 0: at the end)")
    eval_examples: int = doc(200, "held-out rows to evaluate")
    samples_every: int = doc(10, "write sample completions to samples.jsonl every N steps")
    eval_k: int = doc(4, "held-out samples per prompt for pass@k beside greedy accuracy (0: greedy only)")
    diagnostics: DiagnosticsConfig = doc(DiagnosticsConfig(), "thresholds of the collapse / futility warnings")
    stop_on: tuple[str, ...] = doc((), "warnings that stop the run: collapse, entropy, zero_variance, eval_decline")
    keep_best: bool = doc(False, "export the best model by held-out accuracy as best/ beside final/ (needs data.eval_path)")

    def check(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("num_generations: a group needs at least 2 completions for a baseline")
        if not self.rewards:
            raise ConfigError("rewards: give at least one verifier")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ConfigError("eps_low / eps_high must be >= 0")
        if self.dual_clip and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip: must be > 1 (or 0 for off), got {self.dual_clip}")
        if self.temperature <= 0:
            raise ConfigError("temperature: RL needs sampling, must be > 0")
        for kind in self.stop_on:
            if kind not in ALERT_KINDS:
                raise ConfigError(f"stop_on: unknown warning {kind!r} (choose from {', '.join(ALERT_KINDS)})")
        if (self.keep_best or "eval_decline" in self.stop_on) and not self.data.eval_path:
            raise ConfigError("keep_best / stop_on: [eval_decline] need held-out accuracy: set data.eval_path")


RECIPE_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig, "sft": SFTConfig, "grpo": GRPOConfig,
                                   "preference": PreferenceConfig}


def register_recipe_config(name: str, cls: type) -> None:
    RECIPE_CONFIGS[name] = cls


# ---------------------------------------------------------------------------------------------
# Building records from plain data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError:
                continue
        raise bad
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            # A single string is accepted where a list of strings is expected: `report_to=wandb`.
            args = get_args(tp)
            if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
                return tuple(s for s in (p.strip() for p in value.split(",")) if s)
            raise bad
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    shorthand = getattr(cls, "_shorthand", None)
    if shorthand and not isinstance(data, dict):
        data = {shorthand: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping ({cls.__name__}), got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    defaults = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # Partial nested mapping: start from the field's own default, not the class default.
            value = {**_asdict_shallow(defaults[key]), **value}
        kwargs[key] = _convert(value, tp, path)
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _asdict_shallow(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads `3e-4` as a string; read it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {} if child is None or not isinstance(child, str) else {"path": child}
            node[k] = child
        node = child
    node[keys[-1]] = value


def config_from_dict(cls: type, data: dict, overrides: list[str] = ()) -> Any:
    data = dict(data or {})
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    cfg = _build(cls, data, "")
    _check_ranges(cfg, "")
    return cfg


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    data = read_yaml(path) if path else {}
    try:
        return config_from_dict(cls, data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def _check_ranges(cfg: Any, where: str) -> None:
    """Value checks that types cannot express; named so the error points at the field."""
    positive = {"steps", "micro_batch_size", "grad_accum", "max_length", "num_generations",
                "prompts_per_step", "max_completion_length", "num_iterations", "max_gen_batches"}
    non_negative = {"lr", "weight_decay", "warmup_steps", "save_every", "eval_every", "beta", "r"}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(v):
            _check_ranges(v, path)
        elif f.name in positive and isinstance(v, (int, float)) and v <= 0:
            raise ConfigError(f"{path}: must be > 0, got {v!r}")
        elif f.name in non_negative and isinstance(v, (int, float)) and v < 0:
            raise ConfigError(f"{path}: must be >= 0, got {v!r}")
    if hasattr(cfg, "check"):
        cfg.check()


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, doc) for every leaf field, for `--help`."""
    rows = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            sub = field_help(tp, name + ".")
            # Use this record's own default values for nested fields.
            sub = [(n, t, repr(to_dict(_dig(value, n[len(name) + 1:]))), d) for n, t, _, d in sub]
            rows.extend(sub)
        else:
            rows.append((name, _type_name(tp), repr(to_dict(value)), f.metadata.get("doc", "")))
    return rows


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
