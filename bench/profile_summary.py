"""Where each thread of a profiled `run` spends its samples: py-spy's raw (collapsed) output.

    python -m bench.profile_summary profile.txt [--thread MainThread] [--top 25] [--depth 0]

For each thread group (names without their trailing numbers: io_3 → io) the share of samples,
then for the chosen thread the functions that hold the most samples, inclusive (in the stack
anywhere) and at the leaf (running). py-spy records with --idle, so waiting shows as the leaf
(lock acquire, wait, select...).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def parse(path: str):
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", frames[0])
        yield re.sub(r"[-_]?\d+$", "", thread), thread, frames[1:], int(count)


def frame_name(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--thread", default="MainThread", help="a thread group to break down")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    groups, threads = Counter(), {}
    inclusive, leaves = Counter(), Counter()
    total_thread = 0
    for group, thread, frames, count in parse(args.profile):
        groups[group] += count
        threads.setdefault(group, set()).add(thread)
        if group == args.thread:
            total_thread += count
            leaves[frame_name(frames[-1]) if frames else "?"] += count
            for name in set(frame_name(f) for f in frames):
                inclusive[name] += count
    print("thread group: samples (threads)")
    for group, count in groups.most_common():
        print(f"  {group}: {count} ({len(threads[group])})")
    print(f"\n{args.thread}: {total_thread} samples; inclusive")
    for name, count in inclusive.most_common(args.top):
        print(f"  {count / total_thread:6.1%}  {name}")
    print(f"\n{args.thread}: leaf")
    for name, count in leaves.most_common(args.top):
        print(f"  {count / total_thread:6.1%}  {name}")


if __name__ == "__main__":
    main()
