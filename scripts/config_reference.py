"""Print the README's config reference (shared sections once, then each recipe's own fields).

python scripts/config_reference.py > /tmp/ref.md    # tests/test_readme.py checks README holds it
python scripts/config_reference.py --write          # replace the block in README.md
"""

import dataclasses
import re
import sys
import typing
from pathlib import Path

import posttrain.pipeline.stages  # noqa: F401 - registers the pipeline config
from posttrain.config import RECIPE_CONFIGS, field_help

SHARED = ("model", "lora", "data", "optim", "train")


def _row(f, t, d, doc):
    return f"| `{f}` | {t.replace('|', '/')} | `{d.replace('|', '/')}` | {doc.replace('|', '/')} |"


def reference() -> str:
    out = [
        "Shared sections (every recipe has them; defaults differ per recipe: `posttrain RECIPE --help`):",
        "",
        "| field | type | default (sft) | meaning |",
        "|---|---|---|---|",
    ]
    out += [_row(*r) for r in field_help(RECIPE_CONFIGS["sft"]) if r[0].split(".")[0] in SHARED]
    for name in ("pretrain", "sft", "preference", "grpo", "reward_model", "ppo", "pipeline"):
        cls = RECIPE_CONFIGS[name]
        hints = typing.get_type_hints(cls)
        own = [
            r
            for r in field_help(cls)
            if r[0].split(".")[0] not in SHARED or not dataclasses.is_dataclass(hints.get(r[0].split(".")[0]))
        ]
        out += ["", f"`{name}`:", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        out += [_row(*r) for r in own]
    return "\n".join(out) + "\n"


def write_readme(path: Path) -> None:
    text = path.read_text()
    m = re.search(r"(<!-- config-reference:start[^>]*-->\n)(.*)(<!-- config-reference:end -->)", text, re.S)
    if not m:
        raise SystemExit(f"{path}: no config-reference markers")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text[: m.start(2)] + reference() + text[m.end(2) :])
    tmp.replace(path)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(reference(), end="")
