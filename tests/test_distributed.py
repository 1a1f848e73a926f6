"""N ranks compute what one rank computes: every recipe under torchrun (gloo, 2 CPU processes) against
the same recipe in this process with the same global batch; a mutation (local instead of global counts)
breaks it; checkpoints resume across world sizes and after kill -9; two "nodes" on 127.0.0.1; one rank's
error stops the job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.commands.main import main
from posttrain.models.checkpoint import latest_checkpoint
from posttrain.models.tiny import build_tiny_model, build_tokenizer
from posttrain.rl.groups import Group, collect_groups
from posttrain.runtime.tracking import read_metrics

TESTS = Path(__file__).parent
TOL = 1e-5  # float32, 3 optimizer steps (measured: 0 to 3.4e-6)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _torchrun_cmd(args, nproc=2, node=None):
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if node is None:
        launch += ["--standalone"]
    else:  # (rank, port): one of two "nodes" on this machine
        launch += ["--nnodes=2", f"--node-rank={node[0]}", f"--rdzv-endpoint=127.0.0.1:{node[1]}"]
    return launch + [str(TESTS / "dist_worker.py"), *args]


def torchrun(args, nproc=2, timeout=300, **env):
    proc = subprocess.run(_torchrun_cmd(args, nproc), env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run: Path, name="final") -> dict:
    return load_file(str(run / name / "model.safetensors"))


def _max_diff(a: Path, b: Path, name="final") -> float:
    wa, wb = _weights(a, name), _weights(b, name)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


TINY = ["model=tiny", "train.progress=false", "optim.lr=3e-3", "optim.warmup_steps=0", "train.steps=3"]
RL = [
    "data.path=builtin:arithmetic",
    "data.num_examples=100",
    "data.max_length=40",
    "rewards=[toy_rewards:parity]",
    "prompts_per_step=4",
    "num_generations=4",
    "max_completion_length=8",
    "optim.schedule=constant",
    "train.micro_batch_size=4",
    "samples_every=0",
    "beta=0.1",
    "data.eval_path=builtin:arithmetic",
    "eval_examples=8",
]


def recipes(pairs: Path, world: int) -> dict[str, list[str]]:
    """The runs compared: one global batch per step, laid out as micro_batch_size 4 x grad_accum 2 on one
    rank or 4 x 1 on each of two (RL: P=4 prompts, whole groups per rank)."""
    accum = f"train.grad_accum={2 // world}"
    data = ["data.max_length=64", "train.micro_batch_size=4", accum, "data.eval_fraction=0.1", "train.eval_every=3"]
    return {
        "sft": ["sft", *TINY, "data.path=builtin:arithmetic", "data.num_examples=200", *data],
        "dpo": ["dpo", *TINY, f"data.path={pairs}", *data],
        "kto": ["kto", *TINY, f"data.path={pairs}", *data],
        "rm": ["reward-model", *TINY, f"data.path={pairs}", *data],
        "grpo": ["grpo", *TINY, *RL, "dynamic_sampling=true", "max_gen_batches=3", "scale=batch", "num_iterations=2"],
        "ppo": ["ppo", *TINY, *RL, "critic.lr=3e-3", "ppo_epochs=2", "num_mini_batches=2"],
        # a judge (a local causal LM) as the reward: each rank judges its own completions
        "grpo_judge": [
            "grpo",
            *TINY,
            *RL,
            f"rewards=[toy_rewards:parity, {{name: judge, options: {{path: {pairs.parent / 'judge'}}}}}]",
        ],
        # multi-turn episodes (a game: every turn without the right guess gets a reply and goes on)
        "grpo_env": [
            "grpo",
            *TINY,
            *RL,
            f"data.path={pairs.parent / 'guess.jsonl'}",
            "data.max_length=480",
            "data.eval_path=",
            "env.name=guess_number",
            "env.max_turns=3",
            # a random model rarely samples <|im_end|>; a common character as the turn's stop token gives its
            # episodes several turns
            "env.stop_token=e",
            "max_completion_length=48",
            "rewards=[toy_rewards:parity, env_reward]",
            # the rollouts, rewards and losses agree exactly (to 1e-8); 200-token sequences summed in another
            # order move Adam's near-zero-gradient coordinates by ~lr * 1e-2: at the others' 3e-3 that is 3e-5
            "optim.lr=3e-4",
        ],
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Every recipe's run in this process (the reference), and the pairs file they share."""
    from posttrain.tasks import get_task

    root = tmp_path_factory.mktemp("single")
    pairs = root / "pairs.jsonl"
    with pairs.open("w") as fh:
        for r in get_task("arithmetic").rows(40):
            wrong = r["completion"].replace(f"{{{r['answer']}}}", f"{{{int(r['answer']) + 1}}}")
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong}) + "\n")
    judge_tok = build_tokenizer("char")
    build_tiny_model("tiny", judge_tok, seed=5).save_pretrained(root / "judge")
    judge_tok.save_pretrained(root / "judge")
    with (root / "guess.jsonl").open("w") as fh:
        for i in range(40):
            fh.write(
                json.dumps({"prompt": "Guess my number.", "secret": 1 + (7 * i) % 20, "low": 1, "high": 20}) + "\n"
            )
    sys.path.insert(0, str(TESTS))
    for name, argv in recipes(pairs, 1).items():
        assert main([*argv, f"train.output_dir={root / name}"]) == 0, name
    return root, pairs


def test_every_recipe_on_two_ranks_equals_one_rank(single, tmp_path):
    root, pairs = single
    runs = recipes(pairs, 2)
    args = []
    for name, argv in runs.items():
        args += [*argv, f"train.output_dir={tmp_path / name}", "::"]
    torchrun(args[:-1])
    for name in runs:
        assert _max_diff(root / name, tmp_path / name) <= TOL, name
        one, two = read_metrics(root / name), read_metrics(tmp_path / name)
        assert [r["step"] for r in two] == [1, 2, 3], name
        for key in (
            "loss",
            "num_tokens",
            "reward/mean",
            "gen_rounds",
            "kl",
            "eval_loss",
            "eval_accuracy",
            "value_loss",
            "accuracy",
        ):
            if key in one[-1]:
                assert [r.get(key) for r in two] == pytest.approx([r.get(key) for r in one], abs=TOL), (name, key)
    assert _max_diff(root / "ppo", tmp_path / "ppo", "critic") <= TOL
    # only rank 0 wrote the run's record (one metrics line per step) and one HF export
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 3
    # each rank holds half of the weights, gradients and AdamW state: what `posttrain plan` says for FSDP
    # (a tensor with an odd first dimension gives rank 0 the extra row: the tolerance)
    from posttrain.commands.plan import load_shape
    from posttrain.planning import estimate as pl

    est = pl.estimate(load_shape("tiny"), pl.Plan(recipe="sft", gpus=2, strategy="fsdp", device="cpu"))
    got = read_metrics(tmp_path / "sft")[-1]
    for part, key in (("policy weights", "weights"), ("gradients", "grads"), ("optimizer state", "optimizer")):
        assert got[f"memory/{key}_mb"] == pytest.approx(est.get(part) / 2**20, rel=0.02), part
        assert got[f"memory/{key}_mb"] == pytest.approx(
            read_metrics(root / "sft")[-1][f"memory/{key}_mb"] / 2, rel=0.02
        ), part
    saved = json.loads((tmp_path / "grpo" / "final" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]


def test_local_counts_break_the_equality(single, tmp_path):
    """The mutation check: if each rank divided by its own token / sequence counts, the runs would differ."""
    root, pairs = single
    runs = recipes(pairs, 2)
    torchrun(
        [
            *runs["sft"],
            f"train.output_dir={tmp_path / 'sft'}",
            "::",
            *runs["grpo"],
            f"train.output_dir={tmp_path / 'grpo'}",
        ],
        POSTTRAIN_TEST_MUTATION="local_counts",
    )
    assert _max_diff(root / "sft", tmp_path / "sft") > 100 * TOL
    assert _max_diff(root / "grpo", tmp_path / "grpo") > 100 * TOL


def test_two_nodes_on_one_machine_equal_one_rank(single, tmp_path):
    root, pairs = single
    port = _port()
    args = [*recipes(pairs, 2)["grpo"], f"train.output_dir={tmp_path / 'grpo'}"]
    nodes = [
        subprocess.Popen(
            _torchrun_cmd(args, nproc=1, node=(k, port)),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert _max_diff(root / "grpo", tmp_path / "grpo") <= TOL


SFT_RESUME = [
    "sft",
    "model=tiny",
    "train.progress=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "data.path=builtin:arithmetic",
    "data.num_examples=400",
    "data.max_length=48",
    "train.micro_batch_size=4",
    "train.save_every=2",
    "data.eval_fraction=0",
]


def _sft(out: Path, steps: int, world: int) -> list[str]:
    return [*SFT_RESUME, f"train.grad_accum={2 // world}", f"train.steps={steps}", f"train.output_dir={out}"]


def test_checkpoints_resume_across_world_sizes(tmp_path):
    """2 ranks -> 1 rank and 1 rank -> 2 ranks, each resumed from step 2 to 6, equal the uninterrupted
    one-rank run (the global batch is kept: grad_accum doubles on one rank)."""
    assert main(_sft(tmp_path / "ref", 6, 1)) == 0
    torchrun(_sft(tmp_path / "two_one", 2, 2))
    assert (tmp_path / "two_one" / "checkpoints" / "step-00000002" / "optim").is_dir()
    assert main(_sft(tmp_path / "two_one", 6, 1)) == 0  # resume: auto, on one rank
    assert main(_sft(tmp_path / "one_two", 2, 1)) == 0
    torchrun(_sft(tmp_path / "one_two", 6, 2))
    for name in ("two_one", "one_two"):
        assert _max_diff(tmp_path / "ref", tmp_path / name) <= TOL, name
        ref, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / name)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], abs=TOL), name
        assert (tmp_path / name / "resumes.jsonl").exists()


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 torchrun and both ranks at once. torchrun starts each rank in a session of its own, so
    killing torchrun's process group alone would leave the ranks running on as orphans that finish
    the run (and race the resumed one)."""
    pids = [proc.pid, *_descendants(proc.pid)]
    assert len(pids) >= 3, pids  # torchrun + two ranks
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids[1:]):
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_sigkill_of_two_ranks_then_resume_matches_the_uninterrupted_run(tmp_path):
    steps = 40  # the kill lands at step >= 6, before the end
    assert main(_sft(tmp_path / "ref", steps, 1)) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _torchrun_cmd(_sft(killed, steps, 2)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not ((killed / "metrics.jsonl").exists() and len(read_metrics(killed)) >= 6):
        time.sleep(0.05)
    _kill_tree(proc)
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) < steps and not (killed / "final").exists()
    torchrun(_sft(killed, steps, 2))
    assert _max_diff(tmp_path / "ref", killed) <= TOL
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, steps + 1))


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        _torchrun_cmd(
            ["grpo", *TINY, *RL, "rewards=[toy_rewards:fails_on_rank_1]", f"train.output_dir={tmp_path / 'run'}"]
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr and "posttrain grpo: error:" in proc.stderr
    assert time.time() - t0 < 120  # no rank left waiting on a collective


def _group(row, rewards):
    G = len(rewards)
    return Group(
        row, (5,), tuple((6,) for _ in range(G)), ("x",) * G, (False,) * G, tuple(rewards), {"r": tuple(rewards)}
    )


def test_dynamic_sampling_over_ranks_keeps_what_one_process_keeps():
    """Two ranks' rounds (each half of every round's prompts) and one process's rounds (both halves):
    the same rounds are run and the same groups are kept, in the global order, with the same stats."""
    flat, varied = [1.0, 1.0], [0.0, 1.0]
    halves = [  # [rank][round] -> groups
        [[_group(0, flat), _group(1, varied)], [_group(4, varied), _group(5, varied)], [_group(8, varied)] * 2],
        [[_group(2, flat), _group(3, flat)], [_group(6, varied), _group(7, flat)], [_group(9, varied)] * 2],
    ]
    whole = iter([a + b for a, b in zip(*halves)])
    kept1, gen1, stats1 = collect_groups(lambda: next(whole), 3, dynamic=True, max_rounds=5)
    counts = [
        [(sum(g.has_variance for g in r), len(r), sum(not g.has_variance for g in r)) for r in rank] for rank in halves
    ]
    kept2 = []
    for rank in (0, 1):
        rounds, step = iter(halves[rank]), iter(range(5))

        def gather(x, step=step):  # every rank's counts of the round being decided
            i = next(step)
            return [counts[0][i], counts[1][i]]

        kept, _, stats = collect_groups(lambda: next(rounds), 3, dynamic=True, max_rounds=5, gather=gather, rank=rank)  # noqa: B023 - called within this iteration
        kept2 += kept
        assert stats == stats1
    assert [g.row for g in kept2] == [g.row for g in kept1] == [1, 4, 5]
    assert stats1.rounds == 2 and len(gen1) == 8


def test_equal_micro_batch_counts_pad_with_empty_micro_batches():
    from posttrain.recipes.grpo import pad_micro_batches
    from posttrain.runtime.distributed import Dist

    class Busy(Dist):
        def max(self, x):
            return 3.0

    mbs = pad_micro_batches([("real", torch.tensor([0, 1]))], 2, Busy(world=2), 0, "cpu")
    assert len(mbs) == 3 and mbs[0][0] == "real"
    for batch, idx in mbs[1:]:
        assert idx.tolist() == [2] and batch.target_mask_BT.sum() == 0
    one = [("real", torch.tensor([0]))]
    assert pad_micro_batches(one, 1, Dist(), 0, "cpu") is one  # one process: nothing to pair up
