"""`buf breaking` for `make lint`: the work tree's contract against the main
branch's last commit before this change, never against itself.

The baseline, first that applies:
- ``--against REF``, given;
- where this branch left main (the merge-base with `main`, else
  `origin/main`), if this branch has commits of its own;
- otherwise HEAD's parent: on main's tip (CI's clone of main, or a branch
  with nothing committed yet) the change under check is HEAD's own commit
  plus whatever is not committed.

A clone too shallow to hold that commit fails, saying how to fetch it: a
check that silently compares with nothing is what this replaces. In a
repository whose first commit is HEAD, only what is not committed yet can
break a contract: that is compared with HEAD.

Run from the repository's root (where buf.yaml is). Exit code: buf's, or 2
when there is no baseline to fetch.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

MAIN_BRANCHES = ("main", "origin/main")


class NoBaseline(Exception):
    pass


def git(*args: str) -> str | None:
    """git's output, stripped; None when git fails (an unknown ref)."""
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def baseline() -> tuple[str, str]:
    """(commit to compare with, why that one). Raises NoBaseline."""
    head = git("rev-parse", "--verify", "HEAD^{commit}")
    if head is None:
        raise NoBaseline("no commit here (run from the repository's root)")
    for branch in MAIN_BRANCHES:
        if git("rev-parse", "--verify", "--quiet", f"{branch}^{{commit}}") is None:
            continue
        fork = git("merge-base", "HEAD", branch)
        if fork is not None and fork != head:
            return fork, f"where this branch left {branch}"
        break
    parent = git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}")
    if parent is not None:
        return parent, "HEAD's parent, main's last commit before HEAD"
    if git("rev-parse", "--is-shallow-repository") == "true":
        raise NoBaseline(
            "this clone is too shallow to hold the commit before HEAD; "
            "fetch main's history (git fetch --unshallow) or pass --against REF"
        )
    return head, "HEAD, the first commit: only what is not committed can break it"


def buf() -> str:
    here = Path(sys.executable).parent
    found = shutil.which("buf", path=str(here)) or shutil.which("buf")
    if found is None:
        raise SystemExit("check_breaking: buf is not installed (make setup)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git ref to compare with instead")
    args = parser.parse_args(argv)
    if args.against:
        commit = git("rev-parse", "--verify", f"{args.against}^{{commit}}")
        if commit is None:
            print(f"check_breaking: {args.against} is not a commit here", file=sys.stderr)
            return 2
        why = f"--against {args.against}"
    else:
        try:
            commit, why = baseline()
        except NoBaseline as error:
            print(f"check_breaking: {error}", file=sys.stderr)
            return 2
    print(f"buf breaking: the work tree against {commit[:12]} ({why})", flush=True)
    return subprocess.run([buf(), "breaking", "--against", f".git#ref={commit}"]).returncode


if __name__ == "__main__":
    sys.exit(main())
