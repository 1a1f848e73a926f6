import importlib
import pkgutil
import subprocess
import sys

import pytest

import posttrain
from posttrain.commands.main import main


def all_modules():
    return sorted(m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain."))


@pytest.mark.parametrize("name", all_modules())
def test_every_module_imports(name):
    importlib.import_module(name)


def test_recipe_help_lists_fields(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "peak learning rate" in out and "default: 0.0001" in out


def test_cli_config_error_exits_2_naming_key(capsys):
    assert main(["sft", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_cli_data_error_exits_1_naming_row(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    code = main(["sft", f"data.path={bad}", f"train.output_dir={tmp_path / 'r'}", "train.progress=false"])
    assert code == 1
    assert "bad.jsonl:2: missing column 'completion'" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "posttrain.commands.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sft" in out.stdout


def test_pipeline_help_lists_its_fields(capsys):
    assert main(["pipeline", "--help"]) == 0
    out = capsys.readouterr().out
    assert "eval.examples" in out and "controls" in out and "stages" in out


FRESH_IMPORTS = r"""
import importlib, json, os, sys, traceback
# Each posttrain module is imported first thing in a forked child whose sys.modules holds no posttrain module,
# as in a fresh interpreter (a cycle shows when its first module is the one imported first). The third-party
# packages posttrain uses are loaded once, in this parent, so that each child only runs posttrain's own code:
# a first child imports every module and reports which other modules that loaded.
names = sys.argv[1:]
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    os.write(w, json.dumps([m for m in sys.modules if not m.startswith("posttrain")]).encode())
    os._exit(0)
os.close(w)
with os.fdopen(r) as fh:
    third_party = json.loads(fh.read())
os.wait()
for m in third_party:
    try:
        importlib.import_module(m)
    except BaseException:
        pass
assert not [m for m in sys.modules if m.startswith("posttrain")]
failed = 0
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(f"--- import {name} in a fresh interpreter failed:\n{traceback.format_exc()}")
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    """No import cycle at module level: each module, imported before any other of posttrain's, loads."""
    names = all_modules()
    out = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *names], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_the_cli_entry_and_the_configs_import_no_torch():
    """`posttrain --help`, a config error and `posttrain RECIPE --help` answer without importing torch (the
    import-linter contract checks the static graph; this checks what really loads)."""
    code = (
        "import sys; from posttrain.commands.main import main; import posttrain.config; "
        "main(['--help']); main(['sft', '--help']); main(['sft', 'optim.lrr=1']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:] + out.stderr[-2000:]
