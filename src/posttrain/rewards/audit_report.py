"""Reading an audit report (`posttrain audit-verifier --json`) back: what a trainer checks before it trusts a
judge. Kept apart from the audit itself, which imports the judges."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("posttrain")


def audited_false_positive(report_path: str | Path) -> dict[str, float]:
    """{attack: false-positive rate} of an audit report written by `posttrain audit-verifier --json`, for a
    trainer to warn or refuse before it trusts the audited reward. A report without the per-attack table
    (written before it existed) gives each probe's share of rows that got through. ValueError naming the file
    when it is not a readable audit report."""
    path = Path(report_path)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable audit report ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("adversarial"), list):
        raise ValueError(f"{path}: not an audit report (no 'adversarial' list); write one with audit-verifier --json")
    rates = report.get("false_positive_rate")
    if isinstance(rates, dict):
        return {str(k): float(v) for k, v in rates.items()}
    by_probe: dict[str, list[bool]] = {}
    for r in report["adversarial"]:
        by_probe.setdefault(str(r["probe"]), []).append(not r["passed"])
    return {name: sum(bad) / len(bad) for name, bad in by_probe.items()}


def check_audit(report: str | None, max_false_positive: float, policy: str, field: str) -> None:
    """Before a judge is trained against: its audit report's worst attack must not pass more than
    ``max_false_positive`` of the time. Above it, ``policy`` "refuse" raises and "warn" warns loudly; no report
    at all is a warning (an unaudited judge)."""
    if policy not in ("warn", "refuse"):
        raise ValueError(f"{field} option audit_policy: expected warn | refuse, got {policy!r}")
    if not report:
        log.warning(
            "%s: this judge has not been audited: run `posttrain audit-verifier --verifier %s --option path=... "
            "--json AUDIT.json` and pass audit: AUDIT.json (master keys, injected verdicts and padding fool judges)",
            field,
            field,
        )
        return
    rates = audited_false_positive(report)
    over = {k: v for k, v in sorted(rates.items(), key=lambda kv: -kv[1]) if v > max_false_positive}
    if not over:
        return
    text = (
        f"{field}: the audit {report} found attacks that pass this judge more often than "
        f"max_false_positive={max_false_positive}: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(over.items())[:6])
        + ". A policy trained against it can learn them"
    )
    if policy == "refuse":
        raise ValueError(text + " (audit_policy: refuse)")
    log.warning("%s !!! (audit_policy: warn; refuse to stop instead)", text)
