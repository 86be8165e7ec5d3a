"""A run dir's checkpoints: atomic `last.pt`, hard-linked epoch copies, resume, spec check."""

from __future__ import annotations

import errno
import hashlib
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from tid_core.checkpoint import (
    KEEP_EPOCH_CHECKPOINTS,
    CheckpointDir,
    CheckpointWriteError,
    Progress,
    TrainingState,
)


def make_state(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (it + 1))
    return TrainingState(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False))


def take_step(state: TrainingState) -> None:
    state.model(torch.ones(4, 3)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.progress.step += 1


def test_epoch_ends_keep_the_newest_copies_as_hard_links_of_last(tmp_path: Path) -> None:
    checkpoints = CheckpointDir(tmp_path, "spec")
    state = make_state(0)
    for epoch in range(1, 5):
        take_step(state)
        state.progress.epoch = epoch
        saved = checkpoints.save(state, epoch_end=True)
        path = tmp_path / saved.path
        assert saved.path == f"checkpoints/epoch_{epoch:04d}.pt"
        assert path.samefile(checkpoints.last)
        assert saved.bytes == path.stat().st_size
        assert saved.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    kept = sorted(p.name for p in checkpoints.folder.glob("epoch_*.pt"))
    assert len(kept) == KEEP_EPOCH_CHECKPOINTS
    assert kept == ["epoch_0003.pt", "epoch_0004.pt"]

    take_step(state)  # mid-epoch: last.pt only, the epoch copy keeps its bytes
    saved = checkpoints.save(state, epoch_end=False)
    assert saved.path == "checkpoints/last.pt"
    assert not checkpoints.last.samefile(checkpoints.folder / "epoch_0004.pt")


def test_resume_restores_the_saved_state_and_rng(tmp_path: Path) -> None:
    checkpoints = CheckpointDir(tmp_path, "spec")
    assert checkpoints.resume(make_state(1)) is False
    state = make_state(0)
    take_step(state)
    state.progress = Progress(epoch=1, batch=3, step=7, eval_due=True)
    checkpoints.save(state, epoch_end=False)
    expected = (torch.rand(2), random.random())

    resumed = make_state(1)
    assert checkpoints.resume(resumed) is True
    assert resumed.progress == Progress(epoch=1, batch=3, step=7, eval_due=True)
    for name, value in state.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value)
    saved, loaded = state.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for i, buffers in saved["state"].items():
        assert torch.equal(loaded["state"][i]["momentum_buffer"], buffers["momentum_buffer"])
    assert resumed.scheduler.state_dict() == state.scheduler.state_dict()
    rand, rnd = torch.rand(2), random.random()
    assert torch.equal(rand, expected[0]) and rnd == expected[1]


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path: Path) -> None:
    CheckpointDir(tmp_path, "a" * 64).save(make_state(0), epoch_end=False)
    with pytest.raises(ValueError, match=r"written for another spec \(aaaaaaaaaaaa != bbbb"):
        CheckpointDir(tmp_path, "b" * 64).resume(make_state(0))


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = CheckpointDir(tmp_path, "spec")
    state = make_state(0)
    before = checkpoints.save(state, epoch_end=False)

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    state.progress.step = 5
    with pytest.raises(CheckpointWriteError, match="at step 5: No space left on device") as info:
        checkpoints.save(state, epoch_end=False)
    assert info.value.errno == errno.ENOSPC
    assert hashlib.sha256(checkpoints.last.read_bytes()).hexdigest() == before.sha256
    assert not list(checkpoints.folder.glob(".*.tmp.*"))


def test_remove_partial_writes_deletes_a_killed_writers_temporary_files(tmp_path: Path) -> None:
    checkpoints = CheckpointDir(tmp_path, "spec")
    checkpoints.save(make_state(0), epoch_end=True)
    (checkpoints.folder / ".last.pt.tmp.123").write_bytes(b"torn")
    (tmp_path / ".student.pt.tmp.123").write_bytes(b"torn")  # an export's
    checkpoints.remove_partial_writes()
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["epoch_0000.pt", "last.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
