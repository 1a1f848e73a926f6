"""Online diagnostics for RL with verifiable rewards: is the run learning, collapsing, or futile?

A user cannot tell "RL is working" from "RL is destroying the model" by the reward curve alone: a
policy that answers `\\boxed{1}` to every prompt can hold its reward while losing everything else, and a
batch of groups that are all right or all wrong trains on nothing. The pieces here turn each step's
rollouts into a few numbers that say so, and a small ``Monitor`` turns those numbers into warnings
with a cause and a suggestion:

    (a) collapse       one answer across prompts whose gold answers differ
    (b) entropy        token entropy below a fraction of its value at the start of the run
    (c) zero_variance  groups with identical rewards (no learning signal) dominate for many steps,
                       split into all-correct (too easy) and all-wrong (too hard)
    (d) eval_decline   held-out accuracy fell at several evaluations in a row

The metric functions are pure, over plain lists (answers per group, rewards per group), so any RL
recipe (GRPO, PPO) calls the same code; ``rollout_diagnostics`` adapts GRPO's ``Group`` records.
Nothing here imports torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

from posttrain.config import ALERT_KINDS, DiagnosticsConfig
from posttrain.rewards.extract import normalize_answer

# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of one step's rollouts


def answer_diversity(
    answers_PG: Sequence[Sequence[str | None]], gold_P: Sequence[str | None] | None = None
) -> dict[str, float]:
    """Diversity of the extracted final answers of P groups (None: no answer could be extracted).

    diversity/group_distinct  mean over groups of the number of distinct answers (0 for a group
                              with no answer at all); 1.0 means every group agrees internally
    diversity/batch_distinct  distinct answers across the whole batch, divided by P: a healthy policy
                              on prompts with different gold answers sits near or above 1
    diversity/top_share       share of the answered samples that give the batch's most common answer;
                              1.0 across many prompts is collapse to one constant answer
    diversity/no_answer       fraction of samples with no extractable answer
    diversity/gold_top_share  (with ``gold_P``) the same share for the prompts' gold answers: what
                              top_share would be if every answer were right, the level that is not collapse
    """
    flat = [a for g in answers_PG for a in g]
    answered = [a for a in flat if a is not None]
    P = max(1, len(answers_PG))
    out = {
        "diversity/group_distinct": sum(len({a for a in g if a is not None}) for g in answers_PG) / P,
        "diversity/batch_distinct": len(set(answered)) / P,
        "diversity/top_share": Counter(answered).most_common(1)[0][1] / len(answered) if answered else 0.0,
        "diversity/no_answer": 1.0 - len(answered) / max(1, len(flat)),
    }
    golds = [g for g in (gold_P or ()) if g is not None]
    if golds:
        out["diversity/gold_top_share"] = Counter(golds).most_common(1)[0][1] / len(golds)
    return out


def zero_variance_split(
    rewards_PG: Sequence[Sequence[float]], correct_PG: Sequence[Sequence[bool]]
) -> dict[str, float]:
    """Fractions of groups whose rewards are all equal, split by why: every sample correct (the prompt
    is too easy: nothing left to learn) or every sample wrong (too hard: nothing to reinforce). Groups
    with equal rewards and mixed correctness (e.g. a format-only reward) count under neither."""
    P = max(1, len(rewards_PG))
    easy = hard = 0
    for rewards, correct in zip(rewards_PG, correct_PG):
        if max(rewards) - min(rewards) > 1e-9:
            continue
        easy += all(correct)
        hard += not any(correct)
    return {"zero_variance/all_correct": easy / P, "zero_variance/all_wrong": hard / P}


def rollout_diagnostics(
    groups: Iterable,
    answers_of: Callable[[Sequence[str], Sequence[int]], list[str | None]],
    gold_of: Callable[[int], str | None],
    correct_of: Callable[[float], bool],
) -> dict[str, float]:
    """Both metric families for GRPO/PPO ``Group`` records (``row``, ``texts``, ``rewards``, and
    ``components``, whose first verifier defines correctness). ``answers_of(texts, row_indices)`` reads every
    completion's answer in one call (a program's answer needs its row and a sandbox run)."""
    groups = list(groups)
    flat = answers_of([t for g in groups for t in g.texts], [g.row for g in groups for _ in g.texts])
    answers, start = [], 0
    for g in groups:
        answers.append(flat[start : start + len(g.texts)])
        start += len(g.texts)
    correct = [[correct_of(x) for x in next(iter(g.components.values()))] for g in groups]
    return {
        **answer_diversity(answers, [gold_of(g.row) for g in groups]),
        **zero_variance_split([g.rewards for g in groups], correct),
    }


def canonical_answer(extract: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """An answer reader that spells equal answers alike (`\\boxed{ 7 }` and `7.` count as one)."""

    def read(text: str) -> str | None:
        a = extract(text)
        return None if a is None else normalize_answer(a)

    return read


# ---------------------------------------------------------------------------------------------
# Warnings: a small monitor over the logged metrics


@dataclass(frozen=True)
class Alert:
    kind: str  # one of ALERT_KINDS
    step: int
    cause: str  # what was measured
    suggestion: str  # what to try

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.kind}] step {self.step}: {self.cause} Suggestion: {self.suggestion}"


def halves(window: list[float]) -> tuple[float, float]:
    """The means of a window's older half and of its newer half: did a measure move over the window?"""
    half = len(window) // 2
    return sum(window[:half]) / half, sum(window[-half:]) / half


class Monitor:
    """Feed it each step's metrics (``observe``); it returns the warnings that step raised.

    A warning fires once when its condition has held long enough (N steps or evaluations in a row) and
    again only after its measure has been clearly back for as long (N in a row, at least ``rearm_steps``):
    past the threshold by ``rearm_margin`` of it, not merely across it. So a run that stays collapsed, or
    whose entropy hovers at the threshold, is told once, not every few steps. The state is plain data
    (``state_dict``), saved with checkpoints so a resumed run continues the same counts.
    """

    def __init__(self, thresholds: DiagnosticsConfig | None = None):
        self.t = thresholds or DiagnosticsConfig()
        self.runs = {k: 0 for k in ALERT_KINDS}  # consecutive steps (or evaluations) the condition held
        self.active = {k: False for k in ALERT_KINDS}
        self.clear = {k: 0 for k in ALERT_KINDS}  # consecutive steps the condition did not hold
        self.entropy_start: list[float] = []
        self.last_eval: float | None = None
        self.rewards: list[float] = []  # the last flat_window steps' mean training reward
        self.reward_start: float | None = None  # its mean over the run's first flat_window / 2 steps
        self.truncation: list[float] = []  # the last truncation_window steps' truncation rate
        self.entropy_recent: list[float] = []  # the last rearm_steps steps' entropy

    def state_dict(self) -> dict:
        return {
            "runs": dict(self.runs),
            "active": dict(self.active),
            "clear": dict(self.clear),
            "entropy_start": list(self.entropy_start),
            "last_eval": self.last_eval,
            "rewards": list(self.rewards),
            "reward_start": self.reward_start,
            "truncation": list(self.truncation),
            "entropy_recent": list(self.entropy_recent),
        }

    def load_state_dict(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.active.update(state.get("active", {}))
        self.clear.update(state.get("clear", {}))
        self.entropy_start = list(state.get("entropy_start", []))
        self.last_eval = state.get("last_eval")
        self.rewards = list(state.get("rewards", []))
        self.reward_start = state.get("reward_start")
        self.truncation = list(state.get("truncation", []))
        self.entropy_recent = list(state.get("entropy_recent", []))

    def observe(self, step: int, m: dict[str, float]) -> list[Alert]:
        alerts = [
            self._collapse(step, m),
            self._entropy(step, m),
            self._zero_variance(step, m),
            self._eval_decline(step, m),
            self._flat_reward(step, m),
            self._truncation(step, m),
        ]
        return [a for a in alerts if a is not None]

    def _track(self, kind: str, holds: bool | None, needed: int, cleared: bool | None = None) -> bool:
        """Count consecutive holds; True exactly when the count first reaches ``needed`` while the warning
        is not active. It becomes inactive after max(``needed``, rearm_steps) consecutive steps that are
        ``cleared`` (the measure clearly back past the threshold; default: simply not holding); a step in
        between (not holding, not clearly back) restarts that count. ``holds`` None (not measured this step)
        leaves the counts as they are."""
        if holds is None:
            return False
        if not holds:
            self.runs[kind] = 0
            self.clear[kind] = self.clear[kind] + 1 if (cleared if cleared is not None else True) else 0
            if self.clear[kind] >= max(needed, self.t.rearm_steps):
                self.active[kind] = False
            return False
        self.clear[kind] = 0
        self.runs[kind] += 1
        if self.runs[kind] >= needed and not self.active[kind]:
            self.active[kind] = True
            return True
        return False

    def _collapse(self, step: int, m: dict) -> Alert | None:
        share = m.get("diversity/top_share")
        if share is None:
            return None
        gold = m.get("diversity/gold_top_share", 0.0)

        # Prompts whose gold answers are mostly one value (a two-label task) agree for a good reason; and a
        # few answered samples among many unanswered ones say little about the policy's answers.
        def above(threshold: float) -> bool:
            return share >= threshold and gold < self.t.collapse_share and m.get("diversity/no_answer", 0.0) <= 0.5

        holds, cleared = above(self.t.collapse_share), not above(self.t.collapse_share * (1 - self.t.rearm_margin))
        if not self._track("collapse", holds, self.t.collapse_steps, cleared):
            return None
        return Alert(
            "collapse",
            step,
            f"{100 * share:.0f}% of the answered samples give one and the same answer across prompts "
            f"whose gold answers differ (the most common gold answer covers {100 * gold:.0f}%), for "
            f"{self.runs['collapse']} steps; pass@k will fall to the greedy figure.",
            "the policy found a constant answer the reward tolerates or the task is too hard for it: "
            "audit the verifier (posttrain audit-verifier), lower optim.lr, add a KL term (beta > 0), "
            "or start from a stronger SFT model; stop_on: [collapse] with keep_best: true keeps the "
            "model from before the collapse.",
        )

    def _entropy(self, step: int, m: dict) -> Alert | None:
        ent = m.get("entropy")
        if ent is None:
            return None
        if len(self.entropy_start) < self.t.entropy_start_steps:
            self.entropy_start.append(float(ent))
            return None
        start = sum(self.entropy_start) / len(self.entropy_start)
        threshold = self.t.entropy_ratio * start
        # Entropy is noisy from step to step: "clearly back" is judged on its mean over the last
        # entropy_window steps, so a few steps above the threshold do not re-arm it (a clauses run re-warned
        # 15 times with single steps re-arming it).
        self.entropy_recent = [*self.entropy_recent, float(ent)][-self.t.entropy_window :]
        back = sum(self.entropy_recent) / len(self.entropy_recent) >= threshold * (1 + self.t.rearm_margin)
        # Most groups all correct: the policy has learned these prompts, low entropy is what that looks like.
        solved = m.get("zero_variance/all_correct", 0.0) >= 0.5
        holds = None if solved else ent < threshold
        if start <= 0 or not self._track("entropy", holds, 1, back):
            return None
        return Alert(
            "entropy",
            step,
            f"token entropy {ent:.3f} is {100 * ent / start:.0f}% of its start value {start:.3f} "
            f"(threshold {100 * self.t.entropy_ratio:.0f}%): the policy has nearly stopped exploring "
            f"(Cui et al. 2025: accuracy stops rising once entropy is spent).",
            "raise eps_high (Clip-Higher), raise temperature, lower optim.lr, or stop here; pass@k "
            "near greedy accuracy on the held-out set confirms it.",
        )

    def _zero_variance(self, step: int, m: dict) -> Alert | None:
        frac = m.get("zero_variance_frac")
        if frac is None:
            return None
        cleared = frac < self.t.zero_variance_frac * (1 - self.t.rearm_margin)
        if not self._track("zero_variance", frac >= self.t.zero_variance_frac, self.t.zero_variance_steps, cleared):
            return None
        easy, hard = m.get("zero_variance/all_correct", 0.0), m.get("zero_variance/all_wrong", 0.0)
        why = (
            "most are all correct: the prompts are too easy for the policy"
            if easy >= hard
            else "most are all wrong: the prompts are too hard for the policy"
        )
        tip = (
            "use harder prompts (or filter out solved ones), or fewer samples per prompt"
            if easy >= hard
            else "use easier prompts or a curriculum, a stronger SFT model, more samples per prompt "
            "(num_generations) or a higher temperature"
        )
        return Alert(
            "zero_variance",
            step,
            f"{100 * frac:.0f}% of groups had identical rewards (no learning signal) for "
            f"{self.runs['zero_variance']} steps in a row ({100 * easy:.0f}% all correct, "
            f"{100 * hard:.0f}% all wrong at the last step); {why}.",
            f"{tip}; dynamic_sampling: true spends generation only where there is signal.",
        )

    def _eval_decline(self, step: int, m: dict) -> Alert | None:
        acc = m.get("eval_accuracy")
        if acc is None:
            return None
        prev, self.last_eval = self.last_eval, float(acc)
        if prev is None or not self._track("eval_decline", acc < prev, self.t.eval_drops):
            return None
        return Alert(
            "eval_decline",
            step,
            f"held-out accuracy fell at {self.runs['eval_decline']} evaluations in a row, to "
            f"{100 * acc:.1f}%: the policy is over-optimizing the training reward or drifting.",
            "keep_best: true exports the best evaluated model as best/; lower optim.lr, add a KL term "
            "(beta > 0) or train fewer steps.",
        )

    def _flat_reward(self, step: int, m: dict) -> Alert | None:
        """The training reward has not risen over the last ``flat_window`` steps (second half's mean against
        the first half's) and stands no higher than where the run started (its first flat_window / 2 steps):
        RL never got going, or lost what it gained. A plateau after a rise is not this. Steps where most
        groups are all correct are left out: the policy has learned these prompts, and the zero_variance
        warning says so."""
        reward = m.get("reward/mean")
        if reward is None:
            return None
        w = self.t.flat_window
        half = w // 2
        self.rewards = [*self.rewards, float(reward)][-w:]
        if self.reward_start is None and len(self.rewards) == half:
            self.reward_start = sum(self.rewards) / half
        if len(self.rewards) < w:
            return None
        first, second = halves(self.rewards)
        rise, need = second - first, self.t.flat_min_rise
        gained = second - (self.reward_start if self.reward_start is not None else first)
        solved = m.get("zero_variance/all_correct", 0.0) >= 0.5
        holds = None if solved else (rise < need and gained < need)
        if not self._track("flat_reward", holds, 1, rise >= need * (1 + self.t.rearm_margin)):
            return None
        zero = m.get("zero_variance_frac")
        zero_text = (
            ""
            if zero is None
            else (
                f"; {100 * zero:.0f}% of this step's groups had identical rewards "
                f"({100 * m.get('zero_variance/all_wrong', 0.0):.0f}% all wrong)"
            )
        )
        return Alert(
            "flat_reward",
            step,
            f"the mean training reward rose {rise:+.3f} over the last {w} steps ({first:.3f} in the first "
            f"half, {second:.3f} in the second; flat_min_rise {need}) and stands {gained:+.3f} from the "
            f"run's start{zero_text}: RL is not learning "
            f"from this reward.",
            "likely causes, most common first: the prompts are too hard for the policy (groups all "
            "wrong give no signal: a stronger SFT start, easier prompts or a curriculum, more "
            "num_generations, dynamic_sampling: true); the learning rate is too low or the KL term too "
            "strong (optim.lr, beta); the reward cannot be earned by what the policy writes (read "
            "samples.jsonl, run posttrain audit-verifier); or the policy has reached what this reward "
            "can teach it (compare held-out accuracy with the start).",
        )

    def _truncation(self, step: int, m: dict) -> Alert | None:
        """More and more completions run into the length cap: the second half of the last truncation_window
        steps truncates at least truncation_share of them, and truncation_rise more than the first half.
        The seed article's failure to watch for ("completions frequently hitting the max length limit")."""
        rate = m.get("truncation_rate")
        if rate is None:
            return None
        w = self.t.truncation_window
        self.truncation = [*self.truncation, float(rate)][-w:]
        if len(self.truncation) < w:
            return None
        half = w // 2
        first, second = halves(self.truncation)
        holds = second >= self.t.truncation_share and second - first >= self.t.truncation_rise
        cleared = second < self.t.truncation_share * (1 - self.t.rearm_margin)
        if not self._track("truncation", holds, 1, cleared):
            return None
        return Alert(
            "truncation",
            step,
            f"{100 * second:.0f}% of the completions hit the length cap over the last {half} steps, up from "
            f"{100 * first:.0f}% over the {half} before: the policy is learning to run out of tokens, which "
            f"usually means a truncated completion escapes the negative signal a wrong finished answer gets "
            f"(or the task needs more tokens than max_completion_length).",
            "with PPO, leave mask_truncated_completions false (a truncated completion is then a terminal "
            "state with its reward); with GRPO, masking is safe only while groups still contain finished "
            "answers: add an overlong penalty ({name: overlong} in rewards), raise max_completion_length if "
            "correct answers need it, or lower optim.lr; stop_on: [truncation] stops the run here.",
        )
