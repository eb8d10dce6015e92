"""Run the TraceQL rewrite over Tempo's own query corpus and count what is rewritten and refused.

    python -m tests.tempo_corpus path/to/grafana/tempo/pkg/traceql/test_examples.yaml

Every query of ``valid`` must either be rewritten into one whose every spanset filter carries the condition
(re-read by ``verify``) or be refused with a reason; the other sections (queries Tempo refuses) are counted
too. Not a test: Tempo's file is not committed here (docs/LBAC.md has the counts).
"""

from __future__ import annotations

import sys
from collections import Counter

import yaml

from gateway.lbac import RewriteError
from gateway.lbac.traceql import LBRACE, restrict, tokenize, verify

CONDITION = '(resource.env = "dev" && resource.team =~ "a|b")'


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    for section in ("valid", "parse_fails", "validate_fails", "unsupported"):
        rewritten, reasons = 0, Counter[str]()
        for q in doc.get(section) or []:
            try:
                out = restrict(q, CONDITION)
            except RewriteError as exc:
                reasons[str(exc)] += 1
                continue
            verify(out, CONDITION)
            assert out.count(CONDITION) == sum(1 for t in tokenize(out) if t.kind == LBRACE), (q, out)
            rewritten += 1
        print(f"{section}: {rewritten + sum(reasons.values())} queries, {rewritten} rewritten, "
              f"{sum(reasons.values())} refused")
        if section == "valid":
            for reason, n in reasons.most_common():
                print(f"  {n} refused: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
