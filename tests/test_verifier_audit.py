"""`posttrain audit-verifier`: golds must pass, adversarial probes must get nothing, weak verifiers are caught."""

from __future__ import annotations

import json
import sys

import pytest

from posttrain.commands.audit import main, read_jsonl
from posttrain.rewards.audit import run_audit

MATH_ROWS = [
    {"prompt": "1+1?", "answer": "2"},
    {"prompt": "Half of one?", "answer": "\\frac{1}{2}"},
    {"prompt": "sqrt(8)?", "answer": "2\\sqrt{2}"},
]


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MATH_ROWS) + "\n")
    return path


def test_math_audit_passes_and_writes_the_report(math_file, tmp_path):
    out = tmp_path / "report.json"
    code = main(
        [
            "--verifier",
            "math",
            "--data",
            str(math_file),
            "--option",
            "timeout=1",
            "--option",
            "workers=2",
            "--probe-rows",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert [g["got"] for g in report["gold"]] == [1.0, 1.0, 1.0]
    probes = {p["probe"] for p in report["adversarial"]}
    assert {
        "hedge_boxes_wrong_first",
        "right_answer_outside_tags",
        "eval_injection",
        "huge_garbage",
        "pathological_power_tower",
    } <= probes
    assert all(p["got"] == 0.0 for p in report["adversarial"])
    tower = [p for p in report["adversarial"] if p["probe"] == "pathological_power_tower"]
    assert all(p["reason"] == "timeout" for p in tower)


def test_a_regex_that_accepts_anything_fails_the_audit(math_file, tmp_path):
    out = tmp_path / "weak.json"
    code = main(
        [
            "--verifier",
            "regex",
            "--option",
            "pattern=.*",
            "--family",
            "math",
            "--data",
            str(math_file),
            "--json",
            str(out),
        ]
    )
    assert code == 1
    report = json.loads(out.read_text())
    failed = {p["probe"] for p in report["adversarial"] if not p["passed"]}
    assert {"empty", "hedge_boxes_wrong_first", "eval_injection", "format_without_content"} <= failed
    assert any(f.startswith("too easy") for f in report["flags"])


def test_gold_format_mismatch_fails_the_audit(math_file):
    # Golds are rendered as \boxed{...}; a verifier that only reads <answer> tags rejects them all.
    report = run_audit("math", {"extract": "answer_tag", "workers": 1}, MATH_ROWS, probe_rows=0)
    assert len(report.gold_failures) == 3 and not report.ok
    assert any("rejects every gold" in f for f in report.flags)
    assert (
        main(["--verifier", "math", "--option", "extract=answer_tag", "--probe-rows", "0", "--data", str(math_file)])
        == 1
    )


def test_label_json_and_format_families_pass_their_probes():
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    assert run_audit("label", {"labels": ["positive", "negative"]}, rows).ok
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "pop": {"type": "integer"}},
        "required": ["city"],
    }
    rows = [{"answer": {"city": "Paris", "pop": 2}}, {"answer": json.dumps({"city": "Rome", "pop": 3})}]
    report = run_audit("json", {"schema": schema}, rows)
    assert report.ok, [(r.probe, r.got) for r in report.adversarial_failures]
    assert run_audit("format", {}, [{"answer": "4"}]).ok


def test_calibration_flags_too_easy_and_too_hard():
    rows = MATH_ROWS[:2]
    easy = run_audit("format_only", {}, rows, sampled=[[r"\boxed{7}"] * 4, [r"\boxed{8}"] * 4], probe_rows=0)
    assert easy.calibration.verdict == "too easy" and easy.calibration.pass_fraction == 1.0
    hard = run_audit("math", {"workers": 1}, rows, sampled=[["no idea"] * 3, [r"\boxed{9}"] * 3], probe_rows=0)
    assert hard.calibration.verdict == "too hard" and hard.calibration.prompts_none_pass == 1.0
    mixed = run_audit("math", {"workers": 1}, rows, sampled=[[r"\boxed{2}", "x"], [r"\boxed{0.5}", "y"]], probe_rows=0)
    assert mixed.calibration.verdict == "ok" and mixed.calibration.pass_fraction == 0.5


def test_bad_data_line_is_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"answer": "1"}\n{"answer": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(path)
    assert main(["--verifier", "math", "--data", str(path)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_model_sampling_from_a_missing_model_is_a_clear_error(math_file, tmp_path, capsys):
    assert main(["--verifier", "math", "--data", str(math_file), "--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_misnamed_gold_column_is_an_error_not_a_clean_report(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1?", "solution": "2"}\n')
    with pytest.raises(ValueError, match="gold column 'answer'"):
        run_audit("math", {"workers": 1}, read_jsonl(path))
    assert main(["--verifier", "math", "--data", str(path)]) == 2


def test_code_audit_probes_the_sandbox_tricks():
    pytest.importorskip("posttrain.rewards.code")
    from posttrain.rewards.sandbox import SandboxUnavailable

    rows = [
        {
            "tests": [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10\n"}],
            "solution": "print(int(input()) * 2)\n",
        }
    ]
    try:
        report = run_audit("code", {"timeout": 0.5, "workers": 2}, rows, probe_rows=1)
    except SandboxUnavailable as exc:
        pytest.skip(f"no working sandbox here: {exc}")
    assert [g.got for g in report.gold] == [1.0]
    names = {r.probe for r in report.adversarial}
    assert {
        "sys_exit_0",
        "os_exit_0",
        "raise_system_exit",
        "always_equal",
        "monkeypatch_builtins",
        "read_test_files",
        "fork_children",
        "sleep_past_timeout",
        "print_one_expected_output",
        "escape_write_host_file",
    } <= names
    assert report.ok, [(r.probe, r.got, r.reason) for r in report.adversarial_failures]


def test_a_user_function_rejecting_the_default_golds_is_told_which_template_was_used(math_file, tmp_path, capsys):
    (tmp_path / "tagged_rewards.py").write_text(
        "import re\n"
        "def tagged(completion, answer=None, **row):\n"
        "    m = re.search(r'<answer>(.*?)</answer>', completion)\n"
        "    return 1.0 if m and m.group(1).strip() == str(answer) else 0.0\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["--verifier", "tagged_rewards:tagged", "--data", str(math_file), "--probe-rows", "0"]) == 1
        out = " ".join(capsys.readouterr().out.split())
        assert "written as 'The final answer is $\\boxed{{answer}}$.' (change with --gold-template" in out
        assert "(the verifier gave no reason)" in out and "rerun with --gold-template" in out
        assert (
            main(
                [
                    "--verifier",
                    "tagged_rewards:tagged",
                    "--data",
                    str(math_file),
                    "--probe-rows",
                    "0",
                    "--gold-template",
                    "<answer>{answer}</answer>",
                ]
            )
            == 0
        )
    finally:
        sys.path.remove(str(tmp_path))
