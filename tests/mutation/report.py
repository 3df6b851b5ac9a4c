"""Summarise a `mutmut run` per module and write tests/mutation/REPORT.md (`make mutate`).

A mutant counts as killed when a test failed, timed out or crashed on it. Survivors (and
mutants no test reaches) are listed, except those named in ``equivalent.txt`` with the reason
they cannot change a result; those are reported as equivalent and left out of the score.

Usage: ``python tests/mutation/report.py [--min-score 85]`` from the repository root after
``mutmut run``; exits 1 when a module scores below ``--min-score``.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
LINE = re.compile(r"^\s*(?P<name>\S+__mutmut_\d+): (?P<status>.+)$")


def mutmut_results(mutmut: str) -> dict[str, str]:
    """``{mutant name: status}`` from ``mutmut results --all true``."""
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    return {m["name"]: m["status"].strip() for m in map(LINE.match, out.splitlines()) if m}


def equivalents(path: Path = HERE / "equivalent.txt") -> dict[str, str]:
    """``{mutant name: why}`` from lines ``<name>  <one line of why>`` (``#`` comments)."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if line:
            name, _, why = line.partition(" ")
            out[name] = why.strip()
    return out


def module_of(name: str) -> str:
    """``mmlearn.gradients.bogc.x_calibrate__mutmut_3`` -> ``mmlearn.gradients.bogc``."""
    parts = name.split(".")
    while parts and (parts[-1].startswith("x") and "__mutmut_" in parts[-1] or "ǁ" in parts[-1]):
        parts.pop()
    return ".".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-score", type=float, default=85.0)
    parser.add_argument("--mutmut", default=str(Path(sys.executable).parent / "mutmut"))
    args = parser.parse_args()
    results = mutmut_results(args.mutmut)
    if not results:
        print("no mutmut results: run `mutmut run` first", file=sys.stderr)
        return 2
    why = equivalents()
    stale = sorted(set(why) - set(results))
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    open_survivors: dict[str, list[str]] = collections.defaultdict(list)
    for name, status in sorted(results.items()):
        mod = module_of(name)
        if status in KILLED:
            per[mod]["killed"] += 1
        elif name in why:
            per[mod]["equivalent"] += 1
        else:
            per[mod][status] += 1
            open_survivors[mod].append(f"{name} ({status})")
    lines = [
        "# Mutation testing report",
        "",
        "Written by `make mutate` (mutmut over the fast tests in `tests/unit`). Score = killed /",
        "(mutants - equivalent); equivalent mutants are listed with their reason in",
        "`tests/mutation/equivalent.txt`; the last column counts them as survivors.",
        "",
        "| module | mutants | killed | equivalent | survived | no test | score | killed / all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failing = []
    totals: collections.Counter[str] = collections.Counter()
    for mod in sorted(per):
        c = per[mod]
        n = sum(c.values())
        totals.update(c)
        counted = n - c["equivalent"]
        score = 100.0 * c["killed"] / counted if counted else 100.0
        if score < args.min_score:
            failing.append(mod)
        lines.append(
            f"| `{mod}` | {n} | {c['killed']} | {c['equivalent']} | {c['survived']} | "
            f"{c['no tests']} | {score:.1f}% | {100.0 * c['killed'] / n:.1f}% |"
        )
    n = sum(totals.values())
    score = 100.0 * totals["killed"] / max(1, n - totals["equivalent"])
    lines.append(
        f"| **all** | {n} | {totals['killed']} | {totals['equivalent']} | {totals['survived']} "
        f"| {totals['no tests']} | {score:.1f}% | {100.0 * totals['killed'] / max(1, n):.1f}% |"
    )
    lines += ["", "## Open survivors", ""]
    for mod in sorted(open_survivors):
        lines += [f"- `{s}`" for s in open_survivors[mod]]
    if not open_survivors:
        lines.append("None: every surviving mutant is listed as equivalent.")
    if stale:
        lines += ["", "## Stale entries in equivalent.txt (no such mutant now)", ""]
        lines += [f"- `{s}`" for s in stale]
    (HERE / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6 : 8 + len(per) + 1]))
    print(f"report: {HERE / 'REPORT.md'}")
    if failing:
        print(f"below {args.min_score}%: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
