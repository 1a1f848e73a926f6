import importlib
import pkgutil
import subprocess
import sys

import pytest

import posttrain
from posttrain.cli import main


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
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sft" in out.stdout


def test_pipeline_help_lists_its_fields(capsys):
    assert main(["pipeline", "--help"]) == 0
    out = capsys.readouterr().out
    assert "eval.examples" in out and "controls" in out and "stages" in out
