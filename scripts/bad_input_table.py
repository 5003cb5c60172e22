"""Run every case of tests/test_bad_input.py and print a Markdown table of the kinds of bad
input, grouped by entry point, with how each ended (the typed error and its message, or the
command line's one-line error). A case that ends any other way shows as CRASH.

    .venv/bin/python scripts/bad_input_table.py > bad_inputs.md
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import make_world  # noqa: E402
from test_bad_input import CASES, outcome  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as root:
        world = make_world(Path(root) / "world")
        groups = collections.defaultdict(list)
        for i, case in enumerate(CASES):
            tmp = Path(root) / f"case-{i}"
            tmp.mkdir()
            groups[case.entry].append((case, *outcome(case, world, tmp)))
    crashes = 0
    print(f"{len(CASES)} kinds of bad input.\n")
    for entry, rows in groups.items():
        print(f"**{entry}** ({len(rows)})\n\n| bad input | outcome |\n| --- | --- |")
        for case, how, message in rows:
            crashes += how.startswith("CRASH")
            text = message.replace("|", "\\|").replace("\n", " ")[:160]
            print(f"| {case.what.replace('|', chr(92) + '|')} | {how}: {text} |")
        print()
    print(f"Crashes: {crashes}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
