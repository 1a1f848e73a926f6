import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- config-reference:start[^>]*-->\n(.*)<!-- config-reference:end -->", text, re.S)
    assert block, "README lost its config-reference markers"
    fresh = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True, text=True, check=True
    ).stdout
    assert block.group(1) == fresh, (
        "README config reference is stale: regenerate: python scripts/config_reference.py --write"
    )


def test_readme_glossary_covers_every_logged_metric_name():
    text = (ROOT / "README.md").read_text()
    glossary = text[text.index("## Glossary of logged metrics") :]
    src = "".join(p.read_text() for p in (ROOT / "src" / "posttrain" / "recipes").glob("*.py"))
    # metric keys written by the recipes: string literals used as dict keys or keyword names in metrics dicts
    keys = set(re.findall(r'"((?:reward|rewards|logps|time|clip_frac|completion_len)/[a-z_]+)"', src))
    keys |= {
        "loss",
        "lr",
        "grad_norm",
        "entropy",
        "accuracy",
        "zero_variance_frac",
        "gen_rounds",
        "truncation_rate",
        "tokens_per_s",
        "eval_loss",
        "eval_accuracy",
        "kl",
    }
    missing = [k for k in sorted(keys) if f"`{k}`" not in glossary]
    assert not missing, missing


def test_readme_names_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert "`make demo`" in text and "`make test`" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
