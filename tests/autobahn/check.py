#!/usr/bin/env python3
"""Gate on an Autobahn|Testsuite fuzzingclient report.

    check.py REPORT_INDEX_JSON EXPECTED_CASES

Exits 1 on a missing report, a wrong number of cases, any FAILED case, or
any UNIMPLEMENTED case outside 12.* and 13.* (permessage-deflate)."""
import collections
import json
import sys

index, expected = sys.argv[1], int(sys.argv[2])
try:
    with open(index) as f:
        report = json.load(f)
except OSError as e:
    sys.exit(f"no Autobahn report at {index}: {e}")
bad = False
for agent, cases in report.items():
    counts = collections.Counter(c["behavior"] for c in cases.values())
    failed = sorted(k for k, c in cases.items() if "FAILED" in (c["behavior"], c["behaviorClose"]))
    unimplemented = sorted(
        k for k, c in cases.items() if c["behavior"] == "UNIMPLEMENTED" and not k.startswith(("12.", "13."))
    )
    print(f"autobahn {agent}: {len(cases)} cases {dict(counts)}")
    if len(cases) != expected:
        print(f"autobahn {agent}: expected {expected} cases")
        bad = True
    if failed:
        print(f"autobahn {agent}: FAILED {' '.join(failed)}")
        bad = True
    if unimplemented:
        print(f"autobahn {agent}: UNIMPLEMENTED {' '.join(unimplemented)}")
        bad = True
sys.exit(1 if bad else 0)
