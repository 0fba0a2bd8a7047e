"""What a contract case claimed: counts per claim over the drawn examples, and why not.

A check that finds its precondition unmet (a solve that did not converge, options outside a
theorem's hypotheses) makes no claim and says why; it never passes silently. The suite counts
the claims of each case over its examples with a :class:`Tally` and fails the case as *vacuous*
when a required claim was made on fewer than half of them. ``implicit verify --report`` collects
the tallies of every case (``IMPLICIT_VERIFY_REPORT``: a JSON-lines file each case appends to).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import attrs

#: where the suite appends one JSON line per case (set by ``implicit verify --report``)
REPORT_ENV = "IMPLICIT_VERIFY_REPORT"


class ContractViolation(AssertionError):
    """A plugin broke a contract; the message says which and how."""


@attrs.define
class Tally:
    """Claims made (and not made, by reason) by one contract case over its examples."""

    case: str = ""
    contract: str = ""
    examples: int = 0
    made: Counter = attrs.field(factory=Counter)
    not_made: dict = attrs.field(factory=dict)  # claim -> Counter(reason -> count)
    failed: bool = False  # a check raised (the counts then include Hypothesis's shrinking)

    def example(self) -> None:
        self.examples += 1

    def claim(self, name: str) -> None:
        self.made[name] += 1

    def no_claim(self, name: str, reason: str) -> None:
        self.not_made.setdefault(name, Counter())[reason] += 1

    def absorb(self, other: "Tally", suffix: str) -> None:
        """Count ``other``'s claims and reasons here, each name with ``suffix`` (a second check
        of the same example, kept apart so no claim is counted twice for one example)."""
        for name, count in other.made.items():
            self.made[name + suffix] += count
        for name, reasons in other.not_made.items():
            self.not_made.setdefault(name + suffix, Counter()).update(reasons)

    def require(self, names: Iterable[str], share: float = 0.5) -> None:
        """Fail as vacuous when a claim in ``names`` was made on fewer than ``share`` of the
        examples, naming the commonest reason it was not."""
        need = math.ceil(share * self.examples)
        for name in names:
            made = self.made[name]
            if made >= need:
                continue
            reasons = self.not_made.get(name, Counter())
            why = "; ".join(f"{reason} on {count}/{self.examples} examples"
                            for reason, count in reasons.most_common(2)) or "never attempted"
            raise ContractViolation(
                f"{self.case}: vacuous {self.contract} contract: the claim {name!r} was made "
                f"on {made}/{self.examples} drawn examples (at least {need} needed): {why}")

    def as_dict(self) -> dict:
        return {"case": self.case, "contract": self.contract, "failed": self.failed,
                "examples": self.examples,
                "claims": dict(self.made),
                "no_claim": {k: dict(v) for k, v in self.not_made.items()}}


def record(tally: Tally, path: Optional[str] = None) -> None:
    """Append the tally to the report file, if one is set."""
    path = path or os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(tally.as_dict()) + "\n")


def read_report(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def format_report(rows: list[dict], notes: Iterable[str] = ()) -> str:
    """A markdown table: per case and contract, each claim's made/examples, and the reasons a
    claim was not made."""
    lines = ["| contract | case | result | claims made / examples | no claim (reason: count) |",
             "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["contract"], r["case"])):
        n = row["examples"]
        names = sorted(set(row["claims"]) | set(row["no_claim"]))
        claims = ", ".join(f"{name} {row['claims'].get(name, 0)}/{n}" for name in names)
        skips = "; ".join(f"{name}: {reason} ({count})"
                          for name, reasons in sorted(row["no_claim"].items())
                          for reason, count in sorted(reasons.items()))
        result = "**failed**" if row.get("failed") else "passed"
        lines.append(f"| {row['contract']} | {row['case']} | {result} | {claims or '-'} "
                     f"| {skips or '-'} |")
    out = "\n".join(lines)
    notes = list(notes)
    if notes:
        out += "\n\n" + "\n".join(f"- {note}" for note in notes)
    return out + "\n"
