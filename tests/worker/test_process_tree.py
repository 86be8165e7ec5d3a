"""Killing a trainer's process tree reaches processes that left its process group."""

from __future__ import annotations

import subprocess
import time

from processes import alive

from worker import process_tree


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = process_tree._children(todo.pop())
        found.update(children)
        todo.extend(children)
    return found


def test_kill_tree_kills_the_processes_in_sessions_of_their_own() -> None:
    """As torchrun's workers (own sessions) and their loader workers: no group signal reaches
    them, and none has a parent-death signal armed."""
    shell = "setsid bash -c 'sleep 600 & sleep 600' & sleep 600"
    root = subprocess.Popen(["bash", "-c", shell], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(tree := descendants(root.pid)) < 4:  # setsid's bash, its 2 sleeps, a sleep
            assert time.monotonic() < deadline, tree
            time.sleep(0.05)

        process_tree.kill_tree(root.pid)

        assert root.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while [pid for pid in tree if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in tree if alive(pid)] == []
    finally:
        root.kill()
        root.wait()
