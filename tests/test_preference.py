"""The preference recipe on a tiny model: DPO learns a preference, every loss trains, the cached and
the live reference agree, reference-free losses touch no reference, accumulation and resume are exact."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.commands.main import main
from posttrain.config import ConfigError, PreferenceConfig, config_from_dict
from posttrain.data.io import DataError, Rows
from posttrain.models.checkpoint import list_checkpoints
from posttrain.recipes import preference
from posttrain.runtime.tracking import read_metrics
from posttrain.tasks import get_task


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic rows: chosen = the worked solution with the boxed answer; rejected = the same
    steps ending in a wrong, unboxed answer ("= w")."""
    rng = random.Random(seed)
    out = []
    for r in get_task("arithmetic").rows(n, seed=seed):
        v = int(r["answer"])
        w = v + rng.randint(1, 9)
        out.append(
            {
                "prompt": r["prompt"],
                "chosen": r["completion"],
                "rejected": r["completion"].replace(f"\\boxed{{{v}}}", f"= {w}"),
                "answer": r["answer"],
            }
        )
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", toy_pairs(160))


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    rows = []
    for i, p in enumerate(toy_pairs(160, seed=1)):  # alternate: each prompt appears once, half good
        good = i % 2 == 0
        rows.append({"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"], "label": good})
    return write_jsonl(tmp_path_factory.mktemp("data") / "unpaired.jsonl", rows)


def _cfg(tmp_path, data, *overrides, name="run"):
    base = [
        "model=tiny",
        f"data.path={data}",
        "data.max_length=64",
        "data.eval_fraction=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "train.micro_batch_size=8",
        "train.steps=3",
        "train.progress=false",
        "train.resume=never",
        f"train.output_dir={tmp_path / name}",
    ]
    return config_from_dict(PreferenceConfig, {}, base + list(overrides))


def _weights(final):
    return load_file(final / "model.safetensors")


# ------------------------------------------------------------------ learning


def test_dpo_accuracy_and_margin_rise(tmp_path, pairs_file):
    preference.train(
        _cfg(tmp_path, pairs_file, "loss=dpo", "train.steps=20", "data.eval_fraction=0.2", "train.eval_every=10")
    )
    m = read_metrics(tmp_path / "run")
    # Step 1 scores the untouched policy against itself: an exact tie.
    assert m[0]["rewards/margin"] == 0.0 and m[0]["rewards/accuracy"] == 0.0
    assert m[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    early = sum(r["rewards/margin"] for r in m[1:4]) / 3
    late = m[-5:]
    late_margin = sum(r["rewards/margin"] for r in late) / 5
    assert late_margin > 1.0 and late_margin > 2 * early, (early, late_margin)
    assert min(r["rewards/accuracy"] for r in late) >= 0.875
    assert sum(r["loss"] for r in late) / 5 < 0.5 * m[0]["loss"]
    # Held-out pairs: the preference generalises, and the margin grew between the two evals.
    evals = [r for r in m if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] > 0
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "wall_time",
    ):
        assert key in m[-1], key


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo", "kto"])
def test_every_loss_falls(tmp_path, pairs_file, unpaired_file, loss):
    data = unpaired_file if loss == "kto" else pairs_file
    preference.train(_cfg(tmp_path, data, f"loss={loss}", "train.steps=10"))
    m = read_metrics(tmp_path / "run")
    assert sum(r["loss"] for r in m[-3:]) / 3 < 0.9 * m[0]["loss"], [r["loss"] for r in m]
    if loss == "kto":
        assert m[0]["kl"] == 0.0  # the policy is the reference at step 1
        assert all(r["kl"] >= 0 for r in m)
        assert m[-1]["rewards/desirable"] > m[-1]["rewards/undesirable"]
    else:
        assert m[-1]["rewards/margin"] > m[0]["rewards/margin"]


def test_rpo_keeps_the_chosen_answers_likelier_than_dpo_does(tmp_path, pairs_file):
    """The same pairs and steps with and without the NLL term: DPO's margin grows partly by pushing the
    chosen completions down too; with rpo_alpha the chosen log-probs end higher."""
    common = ("loss=dpo", "train.steps=12", "optim.lr=3e-3")
    preference.train(_cfg(tmp_path, pairs_file, *common, name="dpo"))
    preference.train(_cfg(tmp_path, pairs_file, *common, "rpo_alpha=1.0", name="rpo"))
    dpo, rpo = read_metrics(tmp_path / "dpo"), read_metrics(tmp_path / "rpo")
    assert rpo[0]["logps/chosen"] == dpo[0]["logps/chosen"]  # the same start
    assert rpo[0]["loss"] > dpo[0]["loss"]  # the NLL term is in the loss
    late = lambda m, k: sum(r[k] for r in m[-3:]) / 3  # noqa: E731
    assert late(rpo, "logps/chosen") > late(dpo, "logps/chosen") + 1.0
    assert late(rpo, "rewards/accuracy") >= 0.75


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize(
    "loss,extra", [("dpo", ()), ("kto", ()), ("ipo", ("lora.r=4",))], ids=["dpo", "kto-from-pairs", "ipo-lora"]
)
def test_cached_reference_equals_live_reference(tmp_path, pairs_file, loss, extra):
    if extra:
        pytest.importorskip("peft")
    args = (f"loss={loss}", "train.steps=3", "train.micro_batch_size=4", "train.grad_accum=2", *extra)
    a = preference.train(_cfg(tmp_path, pairs_file, *args, "precompute_ref=true", name="cached"))
    b = preference.train(_cfg(tmp_path, pairs_file, *args, "precompute_ref=false", name="live"))
    ma, mb = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "live")
    keys = ["loss", "rewards/margin"] + (["kl", "rewards/desirable"] if loss == "kto" else ["rewards/chosen"])
    for ra, rb in zip(ma, mb):
        for k in keys:
            # kl differences summed log-probs of ~-60: float32 resolution there is ~4e-6.
            assert ra[k] == pytest.approx(rb[k], abs=2e-5 if k == "kl" else 1e-6), (ra["step"], k)
    assert ma[-1]["loss"] != pytest.approx(ma[0]["loss"], abs=1e-3)  # the steps did train
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_load_and_score_no_reference(tmp_path, pairs_file, monkeypatch, loss):
    def forbidden(*a, **k):
        raise AssertionError("a reference-free loss asked for a reference")

    monkeypatch.setattr(preference, "load_frozen", forbidden)
    monkeypatch.setattr(preference, "live_reference", forbidden)
    forwards = []
    real = preference.forward_logits

    def counting(model, ids, *a, **k):
        forwards.append(ids.shape[0])
        return real(model, ids, *a, **k)

    monkeypatch.setattr(preference, "forward_logits", counting)
    preference.train(_cfg(tmp_path, pairs_file, f"loss={loss}", "train.steps=2"))
    # One forward per step, over the 8 chosen and 8 rejected sequences together.
    assert forwards == [16, 16]
    with pytest.raises(ConfigError, match="ref_model"):
        _cfg(tmp_path, pairs_file, f"loss={loss}", "ref_model=/some/sft")


def test_dpo_precomputes_once_then_one_forward_per_micro_batch(tmp_path, pairs_file, monkeypatch):
    forwards = []
    real = preference.forward_logits
    monkeypatch.setattr(
        preference,
        "forward_logits",
        lambda model, ids, *a, **k: forwards.append(ids.shape[0]) or real(model, ids, *a, **k),
    )
    preference.train(
        _cfg(tmp_path, pairs_file, "loss=dpo", "train.steps=2", "train.micro_batch_size=4", "train.grad_accum=2")
    )
    n_pre = -(-160 // 4)  # ceil(160 items / micro-batch 4), both sequences in each forward
    assert len(forwards) == n_pre + 4 and forwards[n_pre:] == [8, 8, 8, 8]


# ------------------------------------------------------------------ invariance and resume


@pytest.mark.parametrize("loss,data", [("dpo", "pairs"), ("kto", "unpaired")])
def test_accumulation_invariance_end_to_end(tmp_path, pairs_file, unpaired_file, loss, data):
    path = pairs_file if data == "pairs" else unpaired_file
    # A small lr: Adam turns float32 rounding in near-zero gradient entries into full-size steps.
    args = (f"loss={loss}", "optim.lr=1e-4")
    a = preference.train(_cfg(tmp_path, path, *args, "train.micro_batch_size=4", "train.grad_accum=1", name="a"))
    b = preference.train(_cfg(tmp_path, path, *args, "train.micro_batch_size=1", "train.grad_accum=4", name="b"))
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in ma] == pytest.approx([r["loss"] for r in mb], abs=1e-6)
    # Adam and clipping hide a constant scale error in the weights; the gradient norm does not.
    assert [r["grad_norm"] for r in ma] == pytest.approx([r["grad_norm"] for r in mb], rel=1e-5)
    if loss == "kto":  # z is one value per step, whatever the micro-batching
        # kl differences summed log-probs of ~-60: float32 resolution there is ~4e-6.
        assert [r["kl"] for r in ma] == pytest.approx([r["kl"] for r in mb], abs=2e-5)
        assert ma[-1]["kl"] > 0


def test_resume_recomputes_the_same_reference_and_continues_exactly(tmp_path, pairs_file):
    args = ("loss=dpo", "train.steps=4", "train.save_every=2", "train.keep_checkpoints=5")
    full = preference.train(_cfg(tmp_path, pairs_file, *args, name="full"))
    part = tmp_path / "part"
    preference.train(_cfg(tmp_path, pairs_file, *args, name="part"))
    # Forget everything after step 2, then resume: the cached reference must again come from the
    # starting weights, not from the step-2 weights the policy is resumed with.
    shutil.rmtree(part / "final")
    shutil.rmtree(list_checkpoints(part)[-1])
    assert list_checkpoints(part)[-1].name == "step-00000002"
    resumed = preference.train(_cfg(tmp_path, pairs_file, *args, "train.resume=auto", name="part"))
    wf, wr = _weights(full), _weights(resumed)
    for k in wf:
        assert torch.allclose(wf[k], wr[k], atol=1e-6), k
    mf, mr = read_metrics(tmp_path / "full"), read_metrics(part)
    assert [r["step"] for r in mr] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margin"):
        assert [r[key] for r in mr] == pytest.approx([r[key] for r in mf], abs=1e-6)


# ------------------------------------------------------------------ data


def test_bad_rows_name_file_line_and_column(tmp_path, capsys):
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4"}]
    )
    out = tmp_path / "r"
    assert main(["dpo", f"data.path={bad}", f"train.output_dir={out}", "train.progress=false"]) == 1
    assert "bad.jsonl:2: missing column 'rejected'" in capsys.readouterr().err
    kto = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "a", "completion": "b", "label": True},
            {"prompt": "a", "completion": "c", "label": False},
            {"prompt": "a", "completion": "d", "label": "yes"},
        ],
    )
    assert main(["kto", f"data.path={kto}", f"train.output_dir={out}", "train.progress=false"]) == 1
    assert "kto.jsonl:3: column 'label' must be true or false" in capsys.readouterr().err
    # Unpaired rows cannot train a paired loss: the error names the missing column.
    with pytest.raises(DataError, match=r"kto.jsonl:1: missing column 'chosen'"):
        preference.train(_cfg(tmp_path, kto, "loss=dpo"))


def test_prompt_tokenized_once_only_completions_count_and_overlong_policy(char_tok):
    rows = Rows(
        [
            {"prompt": "12+3=", "chosen": "15", "rejected": "16"},
            {"prompt": "1+1=", "chosen": "2" * 30, "rejected": "2" * 29 + "3"},
            {"prompt": "9+9=", "chosen": "18" + "x" * 30, "rejected": "19" + "x" * 30},
        ],
        ["f:1", "f:2", "f:3"],
        "f",
    )
    kw = dict(paired=True, split_pairs=False, max_length=16)
    kept = preference.encode_units(char_tok, rows, overlong="drop", **kw)
    assert [u.where for u in kept] == ["f:1"]
    trunc = preference.encode_units(char_tok, rows, overlong="truncate", **kw)
    # Row 2 differs only past the cut (dropped); row 3 still differs at its first digit (kept).
    assert [u.where for u in trunc] == ["f:1", "f:3"]
    assert all(len(u.prompt) + len(c) <= 16 for u in trunc for c in u.completions)
    item = preference.build_items(kept, kto=False, max_length=16)[0]
    chosen, rejected = item.seqs
    p = len(kept[0].prompt)
    assert chosen.input_ids[:p] == rejected.input_ids[:p] == kept[0].prompt
    # Targets: the completion tokens and EOS only ("15" + EOS), nothing from the prompt.
    assert sum(chosen.loss_mask) == 3 and chosen.loss_mask[:p] == (0,) * p


def test_kto_mismatch_partners_and_paired_rows_split():
    assert preference.mismatch_partners([(1,), (1,), (2,), (2,), (3,)]) == [2, 2, 4, 4, 0]
    assert preference.mismatch_partners([(5,), (5,), (5,)]) == [1, 2, 0]


def test_kto_accepts_paired_rows(char_tok):
    rows = Rows(toy_pairs(3), ["f:1", "f:2", "f:3"], "f")
    cfg = config_from_dict(PreferenceConfig, {}, ["loss=kto", "data.max_length=64"])
    items = preference.load_items(char_tok, rows, cfg)
    assert [it.desirable for it in items] == [True, False] * 3
    for i, it in enumerate(items):
        own, mismatched = it.seqs
        prompt = char_tok(rows.rows[i // 2]["prompt"], add_special_tokens=False)["input_ids"]
        assert list(own.input_ids[: len(prompt)]) == list(mismatched.input_ids[: len(prompt)]) == prompt
        # The mismatched completion belongs to a row with another prompt.
        other = char_tok.decode(mismatched.input_ids[len(prompt) :], skip_special_tokens=True)
        assert other in [r[c] for j, r in enumerate(rows.rows) if j != i // 2 for c in ("chosen", "rejected")]


# ------------------------------------------------------------------ config and CLI


@pytest.mark.parametrize(
    "override,field",
    [
        (["loss=ipo", "label_smoothing=0.1"], "label_smoothing"),
        (["loss=dpo", "label_smoothing=0.5"], "label_smoothing"),
        (["loss=orpo", "beta=0.1"], "beta"),
        (["loss=dpo", "kto_desirable_weight=2"], "kto_desirable_weight"),
        (["loss=dpo", "simpo_gamma=0.5"], "simpo_gamma"),
        (["loss=simpo", "precompute_ref=false"], "precompute_ref"),
        (["loss=kto", "kto_undesirable_weight=0"], "kto_undesirable_weight"),
        (["loss=dpo", "beta=0"], "beta"),
        (["loss=ipo", "rpo_alpha=1"], "rpo_alpha"),
        (["loss=dpo", "rpo_alpha=-1"], "rpo_alpha"),
    ],
)
def test_config_combinations_are_checked(override, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict(PreferenceConfig, {}, override)


def test_beta_defaults_per_loss():
    assert config_from_dict(PreferenceConfig, {}, ["loss=dpo"]).effective_beta == 0.1
    assert config_from_dict(PreferenceConfig, {}, ["loss=simpo"]).effective_beta == 2.0
    assert config_from_dict(PreferenceConfig, {}, ["loss=kto", "beta=0.3"]).effective_beta == 0.3


def test_cli_aliases_set_the_loss(monkeypatch, capsys, tmp_path):
    seen = []
    monkeypatch.setattr(preference, "train", lambda cfg: seen.append(cfg) or tmp_path)
    assert main(["simpo", "train.steps=1"]) == 0
    assert main(["orpo", "orpo_lambda=0.2"]) == 0
    assert [(c.loss, c.train.steps) for c in seen] == [("simpo", 1), ("orpo", 100)]
    assert seen[1].orpo_lambda == 0.2
    assert main(["kto", "--help"]) == 0
    assert "kto_desirable_weight" in capsys.readouterr().out
