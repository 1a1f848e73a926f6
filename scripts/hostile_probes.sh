#!/bin/bash
# usage: scripts/hostile_probes.sh [SRC_DIR] [WORK_DIR]
# Issue 13's hostile-user probes of the CLI (tiny model): one line per probe with the exit code, whether a
# traceback was printed and the last line a user sees. SRC_DIR (default: this checkout's src) lets the same
# probes run against another version, e.g. a `git worktree` of an older commit.
ROOT=$(cd "$(dirname "$0")/.." && pwd); SRC=$(cd "${1:-$ROOT/src}" && pwd); W=${2:-$(mktemp -d)}
if [ -e "$W" ] && [ -n "$(ls -A "$W")" ]; then echo "$W is not empty: give a new directory" >&2; exit 2; fi
mkdir -p "$W" && cd "$W" && echo "probing in $W"
PY="env PYTHONPATH=$SRC:$ROOT/tests OMP_NUM_THREADS=1 ${PYTHON:-$ROOT/.venv/bin/python} $ROOT/scripts/_posttrain_main.py"
T="model=tiny train.progress=false data.path=builtin:arithmetic data.num_examples=32 data.max_length=48 train.micro_batch_size=8"
G="$T rewards=[faulty_rewards:inf_first] prompts_per_step=2 num_generations=4 max_completion_length=8 train.steps=1 samples_every=0"
p() { local name=$1; shift; "$@" >out.txt 2>err.txt; rc=$?; last=$(grep -v '^\s*$' err.txt | grep -v 'it/s\]' | tail -1 | cut -c1-220); tb=$(grep -c Traceback err.txt); echo "$name|rc=$rc|traceback=$tb|$last"; }
p "1 inf reward" $PY grpo $G train.output_dir=inf
echo "   metrics: $(head -c 300 inf/metrics.jsonl 2>/dev/null | tr -d '\n' | grep -o '"reward/mean": [^,]*')"
$PY sft $T train.steps=2 train.save_every=1 train.output_dir=r >/dev/null 2>&1
p "2 changed lr into run" $PY sft $T train.steps=2 train.save_every=1 optim.lr=0.5 train.output_dir=r
echo "   config.yaml lr: $(grep -A3 '^optim' r/config.yaml | grep ' lr')"
p "3 resume=never into run" $PY sft $T train.steps=2 train.save_every=1 train.resume=never train.output_dir=r
echo "   checkpoints left: $(ls r/checkpoints 2>/dev/null | tr '\n' ' ')"
p "4 grpo into sft run" $PY grpo $G rewards=[math] train.output_dir=r
echo "   config.yaml recipe: $(grep '^recipe' r/config.yaml)"
p "5 steps below checkpoint" $PY sft $T train.steps=1 train.save_every=1 train.output_dir=r
p "e1 negative lr" $PY sft $T optim.lr=-1 train.steps=1 train.output_dir=e1
printf 'ok\n\xff\xfe bad\n' > bad.jsonl
p "e2 undecodable data" $PY sft $T data.path=bad.jsonl train.steps=1 train.output_dir=e2
p "e3 report on non-run dir" $PY report /tmp
p "e4 eval unknown verifier" $PY eval --model r/final --data builtin:arithmetic --verifier mathh
p "e5 output dir under a file" $PY sft $T train.steps=1 train.output_dir=bad.jsonl/x
p "e6 reward module missing" $PY grpo $G rewards=[nosuch:fn] train.output_dir=e6
