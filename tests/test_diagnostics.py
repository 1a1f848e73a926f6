"""Collapse and futility diagnostics (rl/diagnostics.py, rl/watch.py): the metrics by hand, each
warning from a synthetic run, stop_on through the GRPO and PPO recipes, keep_best, the majority baseline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, DiagnosticsConfig, GRPOConfig, PPOConfig, config_from_dict
from posttrain.evaluation import evaluate, majority_baseline
from posttrain.recipes import grpo, ppo
from posttrain.rl import rollouts
from posttrain.rl.diagnostics import Monitor, answer_diversity, rollout_diagnostics, zero_variance_split
from posttrain.rl.groups import Group
from posttrain.rl.watch import read_warnings
from posttrain.runtime.tracking import read_metrics


def test_answer_diversity_by_hand():
    # 3 groups of 4: {7,7,8,None}, {1,1,1,1}, {1,2,None,None}; golds 7, 1, 2.
    answers = [["7", "7", "8", None], ["1", "1", "1", "1"], ["1", "2", None, None]]
    m = answer_diversity(answers, ["7", "1", "2"])
    assert m["diversity/group_distinct"] == pytest.approx((2 + 1 + 2) / 3)
    assert m["diversity/batch_distinct"] == pytest.approx(4 / 3)  # {7, 8, 1, 2} over 3 prompts
    assert m["diversity/top_share"] == pytest.approx(5 / 9)  # "1": 5 of the 9 answered samples
    assert m["diversity/no_answer"] == pytest.approx(3 / 12)
    assert m["diversity/gold_top_share"] == pytest.approx(1 / 3)
    assert answer_diversity([[None, None]])["diversity/top_share"] == 0.0


def test_zero_variance_split_separates_too_easy_from_too_hard():
    rewards = [[1, 1], [0, 0], [0, 1], [0.5, 0.5]]
    correct = [[True, True], [False, False], [False, True], [True, False]]  # last: equal reward, mixed verdicts
    m = zero_variance_split(rewards, correct)
    assert m == {"zero_variance/all_correct": 0.25, "zero_variance/all_wrong": 0.25}


def _group(row, texts, rewards):
    G = len(texts)
    return Group(
        row, (5,), tuple((6,) for _ in texts), tuple(texts), (False,) * G, tuple(rewards), {"math": tuple(rewards)}
    )


def _collapsing_groups(step, P=4, G=4):
    """Step 1-2: each prompt's samples answer around its own gold (row + 10); from step 3 on every
    sample of every prompt answers \\boxed{1}."""
    out = []
    for p in range(P):
        if step < 3:
            texts = [f"\\boxed{{{p + 10 + (j % 2)}}}" for j in range(G)]
            rewards = [float(j % 2 == 0) for j in range(G)]
        else:
            texts, rewards = ["\\boxed{1}"] * G, [0.0] * G
        out.append(_group(p, texts, rewards))
    return out


def _metrics_of(groups):
    from posttrain.rewards import extract_answer, is_correct
    from posttrain.rewards.registry import per_text
    from posttrain.rl.diagnostics import canonical_answer

    read = per_text(canonical_answer(extract_answer))
    return rollout_diagnostics(groups, read, lambda i: str(i + 10), is_correct)


def test_a_synthetic_collapsing_run_triggers_the_collapse_warning_once():
    mon = Monitor(DiagnosticsConfig(collapse_steps=3))
    fired = {}
    for step in range(1, 9):
        m = _metrics_of(_collapsing_groups(step))
        for a in mon.observe(step, m):
            fired.setdefault(a.kind, []).append(a)
    (alert,) = fired["collapse"]
    assert alert.step == 5  # collapsed from step 3, three steps in a row
    assert "100% of the answered samples give one and the same answer" in alert.cause
    assert "audit" in alert.suggestion


def test_a_warning_hovering_at_its_threshold_fires_once_until_it_has_cleared_as_long():
    mon = Monitor(DiagnosticsConfig(collapse_steps=3))
    at, below = {"diversity/top_share": 0.95}, {"diversity/top_share": 0.5}
    # held 3 (fires at 3), one dip, held 3 again: the same episode; then clear for 3 steps, held 3: fires
    seq = [at] * 3 + [below] + [at] * 3 + [below] * 3 + [at] * 3
    steps = [s for s, m in enumerate(seq, 1) for a in mon.observe(s, m) if a.kind == "collapse"]
    assert steps == [3, 13]


def test_no_collapse_warning_when_the_gold_answers_themselves_agree():
    # A two-label task where every prompt's gold answer is "1": answering 1 everywhere is right, not collapse.
    mon = Monitor(DiagnosticsConfig(collapse_steps=1))
    m = rollout_diagnostics(
        [_group(p, ["\\boxed{1}"] * 4, [1.0] * 4) for p in range(4)],
        lambda texts, rows: ["1"] * len(texts),
        lambda i: "1",
        lambda s: s >= 1,
    )
    assert m["diversity/top_share"] == 1.0 and m["diversity/gold_top_share"] == 1.0
    assert mon.observe(1, m) == []


def test_entropy_warning_relative_to_the_start():
    mon = Monitor(DiagnosticsConfig(entropy_ratio=0.25, entropy_start_steps=2, rearm_steps=1))
    seq = [1.0, 0.8, 0.5, 0.3, 0.2, 0.15, 0.5, 0.1]  # start 0.9; below 0.225 at steps 5, 6 and 8
    steps = [s for s, e in enumerate(seq, 1) for a in mon.observe(s, {"entropy": e}) if a.kind == "entropy"]
    assert steps == [5, 8]  # once per episode: it cleared at step 7 and fell again at step 8


def test_entropy_hovering_at_its_threshold_warns_once():
    """Entropy that hovers at the threshold (the run that warned 21 times in 250 steps): below it, then just
    above it (not clearly back: within rearm_margin), over and over, is one episode and one warning."""
    mon = Monitor(DiagnosticsConfig(entropy_ratio=0.25, entropy_start_steps=2))  # start 1.0: threshold 0.25
    seq = [1.0, 1.0] + [0.24, 0.26, 0.27, 0.28] * 62  # 0.26..0.28 < 0.25 * 1.2: never clearly back
    steps = [s for s, e in enumerate(seq, 1) for a in mon.observe(s, {"entropy": e}) if a.kind == "entropy"]
    assert steps == [3]


def test_entropy_warns_again_only_after_it_was_clearly_back_for_rearm_steps():
    mon = Monitor(DiagnosticsConfig(entropy_ratio=0.25, entropy_start_steps=2, rearm_margin=0.2, rearm_steps=3))
    # fires at 3; clearly back (0.4 >= 0.3) for 2 steps only, so 6 is the same episode; back 3 steps, 10 fires
    seq = [1.0, 1.0, 0.2, 0.4, 0.4, 0.2, 0.4, 0.4, 0.4, 0.2]
    steps = [s for s, e in enumerate(seq, 1) for a in mon.observe(s, {"entropy": e}) if a.kind == "entropy"]
    assert steps == [3, 10]


def test_noisy_entropy_around_its_threshold_warns_once_and_a_solved_task_not_at_all():
    """The clauses run: entropy jumping between 0.004 and 0.015 around a 0.009 threshold re-warned 15 times,
    single steps above it re-arming the warning; re-arming now needs the recent mean clearly back."""
    mon = Monitor(DiagnosticsConfig(entropy_ratio=0.1, entropy_start_steps=1))
    seq = [0.092] + [0.004, 0.012, 0.012, 0.012, 0.003, 0.002, 0.001] * 40  # 3 steps above, then below
    steps = [s for s, e in enumerate(seq, 1) for a in mon.observe(s, {"entropy": e}) if a.kind == "entropy"]
    assert steps == [2]
    solved = Monitor(DiagnosticsConfig(entropy_ratio=0.1, entropy_start_steps=1))
    m = {"zero_variance/all_correct": 0.9}
    assert not [a for s, e in enumerate(seq, 1) for a in solved.observe(s, {**m, "entropy": e}) if a.kind == "entropy"]


def test_a_flat_training_reward_warns_once_with_its_likely_causes():
    """The run whose mean reward stayed at 0.22-0.28 for 600 steps raised nothing: now it is one warning."""
    mon = Monitor(DiagnosticsConfig(flat_window=100, flat_min_rise=0.02))
    alerts = []
    for step in range(1, 601):
        m = {
            "reward/mean": 0.25 + 0.03 * ((step * 7919) % 13 - 6) / 6,
            "zero_variance_frac": 0.6,
            "zero_variance/all_correct": 0.05,
            "zero_variance/all_wrong": 0.55,
        }
        alerts += [a for a in mon.observe(step, m) if a.kind == "flat_reward"]
    (alert,) = alerts
    assert alert.step == 100 and "not learning from this reward" in alert.cause and "55% all wrong" in alert.cause
    assert "too hard" in alert.suggestion and "optim.lr" in alert.suggestion and "audit-verifier" in alert.suggestion


def test_a_plateau_after_learning_is_not_a_flat_reward():
    """The demo's GRPO reward rises, then creeps (+0.017 over 100 steps at step 420): that is a plateau of a
    run that learned, not one that never started; the warning compares with the run's start too."""
    mon = Monitor(DiagnosticsConfig(flat_window=200))
    curve = [0.3 + 0.4 * min(s, 300) / 300 + 0.01 * ((s * 7919) % 7 - 3) / 3 for s in range(1, 801)]
    assert not [a for s, r in enumerate(curve, 1) for a in mon.observe(s, {"reward/mean": r})]


def test_a_rising_or_solved_training_reward_does_not_warn_flat():
    rising, solved = Monitor(DiagnosticsConfig(flat_window=100)), Monitor(DiagnosticsConfig(flat_window=100))
    for step in range(1, 601):
        assert not rising.observe(step, {"reward/mean": 0.2 + 0.6 * step / 600})  # +0.05 per 100 steps
        # flat at the top: most groups are all correct, which is the zero_variance warning's business
        assert not [
            a
            for a in solved.observe(step, {"reward/mean": 0.97, "zero_variance/all_correct": 0.9})
            if a.kind == "flat_reward"
        ]


def test_zero_variance_warning_names_too_hard():
    mon = Monitor(DiagnosticsConfig(zero_variance_frac=0.8, zero_variance_steps=4))
    m = {"zero_variance_frac": 0.9, "zero_variance/all_correct": 0.1, "zero_variance/all_wrong": 0.8}
    alerts = [a for s in range(1, 7) for a in mon.observe(s, m)]
    assert [a.step for a in alerts] == [4]
    assert "too hard" in alerts[0].cause and "curriculum" in alerts[0].suggestion
    mon2 = Monitor(DiagnosticsConfig(zero_variance_steps=1))
    easy = mon2.observe(1, {"zero_variance_frac": 1.0, "zero_variance/all_correct": 1.0})
    assert "too easy" in easy[0].cause


def test_eval_decline_needs_consecutive_drops():
    mon = Monitor(DiagnosticsConfig(eval_drops=3))
    accs = [0.5, 0.4, 0.45, 0.42, 0.41, 0.40, 0.39]  # drops at evals 2, 4, 5, 6, 7: three in a row at eval 6
    fired = [i for i, a in enumerate(accs, 1) for al in mon.observe(i * 10, {"eval_accuracy": a})]
    assert fired == [6]
    # State survives a checkpoint round trip: a resumed monitor continues the same count.
    again = Monitor(DiagnosticsConfig(eval_drops=3))
    again.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert again.runs == mon.runs and again.last_eval == 0.39


def test_majority_baseline_by_hand():
    rows = [
        {"prompt": "a", "answer": "3"},
        {"prompt": "b", "answer": "3.0"},
        {"prompt": "c", "answer": "5"},
        {"prompt": "d", "answer": "3"},
    ]
    # "3.0" is not normalized into "3": gold answers are compared as the dataset spells them.
    assert majority_baseline(rows) == (0.5, "3")
    assert majority_baseline(
        [{"prompt": "x", "label": "pos"}, {"prompt": "y", "label": "pos"}, {"prompt": "z", "label": "neg"}]
    ) == (pytest.approx(2 / 3), "pos")
    assert majority_baseline([{"prompt": "x"}]) is None


def test_versus_the_majority_baseline_says_not_significantly_above_when_the_interval_reaches_it():
    from posttrain.evaluation import EvalSummary, format_summary, versus_baseline, wilson

    # the printed case: 30.5% on 200 prompts (interval [24.5, 37.2]) against a 25.5% baseline
    ci = wilson(61, 200)
    assert ci[0] < 0.255 < 0.305
    assert versus_baseline(0.305, ci, 0.255) == "not significantly above"
    assert versus_baseline(0.20, wilson(40, 200), 0.255) == "below"
    assert versus_baseline(0.50, wilson(100, 200), 0.255) == "above"
    s = EvalSummary(n_prompts=200, greedy_accuracy=0.305, greedy_ci=ci, majority_baseline=0.255, majority_answer="3")
    assert "NOT SIGNIFICANTLY ABOVE the majority baseline" in format_summary(s) and s.above_majority is False


def test_evaluation_reports_the_majority_baseline_and_flags_a_model_below_it(tiny_model, char_tok):
    from posttrain.rewards import load

    rows = [{"prompt": f"{i}+0=", "answer": "1" if i < 6 else str(i)} for i in range(8)]
    s = evaluate(tiny_model, char_tok, rows, load("math"), max_new_tokens=4)
    assert s.majority_baseline == 0.75 and s.majority_answer == "1"
    assert s.greedy_accuracy == 0.0 and s.above_majority is False  # a random model answers nothing
    assert s.to_json()["majority_baseline"] == 0.75


def _cfg(tmp_path, *extra, recipe=GRPOConfig):
    return config_from_dict(
        recipe,
        {},
        [
            "model=tiny",
            "data.path=builtin:arithmetic?max_terms=2",
            "data.num_examples=40",
            "data.max_length=16",
            "data.eval_path=builtin:arithmetic?max_terms=3",
            "eval_examples=8",
            "eval_k=0",
            "rewards=[math]",
            "prompts_per_step=4",
            "num_generations=4",
            "max_completion_length=6",
            "train.micro_batch_size=16",
            f"train.output_dir={tmp_path}",
            "train.progress=false",
            "samples_every=0",
            *extra,
        ],
    )


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_rl_run_stops_on_collapse_and_says_why(tmp_path, monkeypatch, recipe):
    calls = iter(range(1, 100))

    def fake_sample_groups(engine, tok, rows, prompt_ids, picked, G, *rest):
        step = next(calls)
        return [_group(i, g.texts, g.rewards) for i, g in zip(picked, _collapsing_groups(step, len(picked), G))]

    monkeypatch.setattr(rollouts, "sample_groups", fake_sample_groups)  # GRPO and PPO both sample through it
    config, train = {"grpo": (GRPOConfig, grpo.train), "ppo": (PPOConfig, ppo.train)}[recipe]
    cfg = _cfg(tmp_path, "train.steps=10", "stop_on=[collapse]", "diagnostics.collapse_steps=2", recipe=config)
    with pytest.raises(ConfigError, match="stop_on: unknown warning"):
        _cfg(tmp_path, "stop_on=[colapse]", recipe=config)
    train(cfg)
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2, 3, 4]  # collapsed at 3, warned and stopped at 4
    assert m[-1]["warning/collapse"] == 1.0 and m[-1]["diversity/top_share"] == 1.0
    (w,) = read_warnings(tmp_path)
    assert (w.kind, w.step) == ("collapse", 4)
    assert (tmp_path / "final" / "COMPLETE").exists()
    # Resuming a stopped run does not train on: the stop is part of the checkpoint.
    train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_keep_best_exports_the_best_evaluated_model(tmp_path, monkeypatch):
    accs = iter([0.25, 0.5, 0.375, 0.125])
    monkeypatch.setattr(rollouts, "held_out_metrics", lambda *a, **k: {"eval_accuracy": next(accs)})
    cfg = _cfg(
        tmp_path,
        "train.steps=4",
        "eval_every=1",
        "keep_best=true",
        "train.save_every=1",
        "train.keep_checkpoints=4",
        "optim.lr=1e-2",
        "rewards=[toy_rewards:parity]",
    )
    grpo.train(cfg)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"step": 2, "eval_accuracy": 0.5}
    got = load_file(tmp_path / "best" / "model.safetensors")
    at_2 = load_file(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(got[k], at_2[k]) for k in at_2)
    assert any(not torch.equal(got[k], final[k]) for k in final)  # the later steps changed the weights
    with pytest.raises(ConfigError, match="keep_best"):
        config_from_dict(GRPOConfig, {}, ["keep_best=true"])


def test_a_few_identical_answers_among_unanswered_samples_are_not_collapse():
    mon = Monitor(DiagnosticsConfig(collapse_steps=1))
    m = answer_diversity([["1", None, None, None], ["1", None, None, None]], ["3", "4"])
    assert m["diversity/top_share"] == 1.0 and m["diversity/no_answer"] == 0.75
    assert mon.observe(1, m) == []


def test_held_out_metrics_closes_the_verifier_it_loads(monkeypatch):
    """Each held-out evaluation loads the first reward's verifier; its worker processes (math) must go
    when the evaluation ends, not whenever the object is collected."""
    import types

    from posttrain.rl import watch
    from posttrain.rl.watch import held_out_metrics

    closed = []
    check = types.SimpleNamespace(close=lambda: closed.append(1))
    monkeypatch.setattr(watch, "load", lambda name, **options: check)
    summary = types.SimpleNamespace(greedy_accuracy=0.5, majority_baseline=None, pass_at_k=None)
    monkeypatch.setattr(watch, "evaluate", lambda *a, **k: summary)
    cfg = config_from_dict(GRPOConfig, {})
    assert held_out_metrics(None, None, [{"prompt": "1+1=", "answer": "2"}], cfg) == {"eval_accuracy": 0.5}
    assert closed == [1]


# --- every verifier's answers read as it reads them (issue 22) --------------------------------------------


class _Scripted:
    """A rollout engine that answers each prompt with scripted texts: greedy the first, samples in turn."""

    def __init__(self, tok, texts_by_prompt):
        self.tok, self.texts = tok, texts_by_prompt

    def generate(self, prompts, n, params):
        from posttrain.rollout.engine import Generation

        outs = [self.texts[i][0 if params.temperature == 0 else 1 + j] for i in range(len(prompts)) for j in range(n)]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in outs]
        return Generation(prompts, ids, [False] * len(ids), None)


def test_maj_at_k_and_the_expected_answer_for_bare_labels(char_tok):
    from posttrain.rewards import load

    v = load("label", labels=["positive", "negative"])
    rows = [{"prompt": "good", "label": "positive"}, {"prompt": "bad", "label": "negative"}]
    texts = [["positive", "positive", "Positive!", "negative"], ["positive", "negative", "NEGATIVE", "positive"]]
    s = evaluate(None, char_tok, rows, v, k=3, engine=_Scripted(char_tok, texts))
    # prompt 1: votes positive x2, negative -> right; prompt 2: negative x2 (folded), positive -> right
    assert s.greedy_accuracy == 0.5 and s.maj_at_k == 1.0 and s.maj_at_k_missing is None
    assert [x["expected"] for x in s.samples] == ["positive", "negative"]
    assert s.majority_baseline is None  # two rows, two labels: no answer distribution to exploit


def test_diversity_and_maj_at_k_read_json_answers_by_their_checked_fields(char_tok):
    from posttrain.evaluation import majority_correct
    from posttrain.rewards import load
    from posttrain.rewards.registry import answer_reader

    v = load("json", fields=["name", "age"])
    read, gold = answer_reader(v)

    def extract(text):
        return read([text], [{}])[0]

    a = extract('{"name": "Ada", "age": 36, "note": "x"}')
    assert a == extract('```json\n{"age": 36, "name": "ada"}\n```') == gold({"answer": {"name": "ADA", "age": 36}})
    assert extract('{"name": "Ada", "age": 37}') != a and extract("no json here") is None
    assert extract('{"name": "Ada", "age": 36} or {"name": "Bo", "age": 3}') is None  # hedged
    answers = [
        extract(t) for t in ('{"name": "Ada", "age": 36}', '{"age": 36, "name": "ada"}', '{"name": "Bo", "age": 3}')
    ]
    assert majority_correct(answers, [True, True, False])
    groups = [_group(p, ['{"name": "Ada", "age": 36}'] * 3 + ["oops"], [1.0, 1.0, 1.0, 0.0]) for p in range(2)]
    m = rollout_diagnostics(groups, read, lambda i: [a, extract('{"name": "Bo", "age": 3}')][i], lambda s: s >= 1)
    assert m["diversity/no_answer"] == pytest.approx(2 / 8) and m["diversity/top_share"] == 1.0
    assert m["diversity/gold_top_share"] == 0.5


def test_collapse_fires_on_a_run_that_collapses_to_one_label():
    from posttrain.rewards import load
    from posttrain.rewards.registry import answer_reader

    answers, gold = answer_reader(load("label", labels=["indemnity", "termination", "warranty"]))
    golds = ["indemnity", "termination", "warranty", "termination"]
    mon, fired = Monitor(DiagnosticsConfig(collapse_steps=3)), []
    for step in range(1, 9):
        # bare labels, as a classifier answers: varied at first, then "indemnity" for every prompt from step 3
        texts = [[golds[p]] * 4 if step < 3 else ["Indemnity."] * 4 for p in range(4)]
        groups = [_group(p, texts[p], [float(t.lower().startswith(golds[p])) for t in texts[p]]) for p in range(4)]
        m = rollout_diagnostics(groups, answers, lambda i: gold({"label": golds[i]}), lambda s: s >= 1)
        assert m["diversity/no_answer"] == 0.0  # a bare label is an answer (it read as none, 1.0, before)
        fired += [a.step for a in mon.observe(step, m) if a.kind == "collapse"]
    assert fired == [5]


def test_evaluation_breaks_greedy_answers_down_as_the_verifier_sees_them(char_tok):
    """A label task gets its confusion matrix, an extraction task its accuracy per field; the report shows
    both (issue 22)."""
    from posttrain.report.pipeline import breakdown_table
    from posttrain.rewards import load

    v = load("label", labels=["pos", "neg"])
    rows = [
        {"prompt": "a", "label": "pos"},
        {"prompt": "b", "label": "pos"},
        {"prompt": "c", "label": "neg"},
        {"prompt": "d", "label": "neg"},
    ]
    texts = [["pos"], ["neg"], ["maybe"], ["NEG."]]
    s = evaluate(None, char_tok, rows, v, engine=_Scripted(char_tok, texts))
    assert s.breakdown["counts"] == {"pos": {"pos": 1, "neg": 1}, "neg": {"(not a label)": 1, "neg": 1}}
    html = breakdown_table(s.breakdown)
    assert '<td class="num diag">1</td>' in html and "(not a label)" in html
    j = load("json", fields=["name", "age"])
    golds = [{"prompt": "x", "answer": {"name": "Ada", "age": 36}}, {"prompt": "y", "answer": {"name": "Bo", "age": 3}}]
    texts = [['{"name": "ada", "age": 36}'], ['{"name": "Bo", "age": 4}']]
    s = evaluate(None, char_tok, golds, j, engine=_Scripted(char_tok, texts))
    assert s.breakdown == {"kind": "fields", "n": 2, "accuracy": {"name": 1.0, "age": 0.5}}
    assert "<td>age</td><td class=num>50.0%</td>" in breakdown_table(s.breakdown)


def test_no_majority_baseline_when_every_gold_answer_differs():
    """Extraction rows each have their own gold object: "always answer the most common one" scores 1/n, a
    baseline that says nothing (it flagged every stage as below it)."""
    rows = [{"answer": str(i)} for i in range(5)]
    assert majority_baseline(rows) is None and majority_baseline(rows[:1]) == (1.0, "0")
