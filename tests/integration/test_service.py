"""REST -> Celery worker -> torchrun -> COCO mAP, on real processes and a real broker/database."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from coco_folders import COCO_2017, with_split_names
from databases import ANY_BACKEND
from service_jobs import make_dataset, teacher_of, tiny_spec
from torchvision.models import resnet18

from tid_core.data.synthetic import generate_shapes
from tid_core.models import load_student

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def run_dir(stack: Any, job_id: str) -> Path:
    return stack.settings.jobs_dir / job_id


@pytest.mark.parametrize("stack", ANY_BACKEND, indirect=True)
def test_submit_train_distill_download(stack: Any, tmp_path: Path) -> None:
    stack.start_worker("worker")
    client = stack.client
    dataset_id = make_dataset(client)

    teacher = client.submit(tiny_spec(dataset_id, "teacher"))
    assert teacher["state"] == "queued"
    seen_running_metrics = False
    while (job := client.job(teacher["id"]))["state"] not in ("succeeded", "failed", "cancelled"):
        if job["state"] == "running" and client.metrics(teacher["id"])["data"]:
            seen_running_metrics = True  # rows appear while it trains, not only at the end
        time.sleep(0.2)
    assert job["state"] == "succeeded", (job, stack.log("worker"))
    assert seen_running_metrics
    assert job["attempt"] == 1

    student = client.submit(
        tiny_spec(
            dataset_id,
            "student",
            # the teacher's backbone also initialises the student's (both ResNet18)
            student={"weights_backbone": {"job": teacher["id"]}},
            teacher=teacher_of(teacher["id"]),
            distill={"method": "tid", "distill_warmup_iters": 2},
        )
    )
    job = client.wait_job(student["id"], timeout=300, interval=0.5)
    assert job["state"] == "succeeded", (job, stack.log("worker"))

    metrics = client.metrics(student["id"])
    names = {m["name"] for m in metrics["data"]}
    assert {"loss", "lr", "tid_key", "tid_weak", "tid_rest", "eval/AP"} <= names
    assert {m["step"] for m in metrics["data"] if m["name"] == "loss"} == set(range(1, 9))
    evaluations = metrics["evaluations"]
    assert len(evaluations) == 2 and evaluations[-1]["backend"] == "faster-coco-eval"
    assert {"ap", "ap50", "ap75", "aps", "apm", "apl", "per_class"} <= evaluations[-1].keys()

    checkpoints = client.request("GET", f"/v1/jobs/{student['id']}/checkpoints")["data"]
    assert checkpoints
    for ckpt in checkpoints:
        path = run_dir(stack, student["id"]) / ckpt["path"]
        if path.exists():  # older epoch files are pruned; the newest must be there
            assert hashlib.sha256(path.read_bytes()).hexdigest() == ckpt["sha256"]
    newest = run_dir(stack, student["id"]) / checkpoints[-1]["path"]
    assert hashlib.sha256(newest.read_bytes()).hexdigest() == checkpoints[-1]["sha256"]

    out = tmp_path / "student.safetensors"
    etag = client.download(student["id"], "student.safetensors", out)
    assert etag == hashlib.sha256(out.read_bytes()).hexdigest()
    model, meta = load_student(out)
    assert meta.num_classes == 5 and not model.training


def test_two_workers_two_jobs_each_claimed_once(stack: Any) -> None:
    stack.start_worker("worker-a")
    stack.start_worker("worker-b")
    client = stack.client
    dataset_id = make_dataset(client)
    ids = [client.submit(tiny_spec(dataset_id, f"job-{i}"))["id"] for i in range(2)]
    jobs = [client.wait_job(job_id, timeout=300, interval=0.5) for job_id in ids]
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], stack.log(
        "worker-a"
    ) + stack.log("worker-b")
    for job_id in ids:
        assert client.job(job_id)["attempt"] == 1
        events = client.http.get(f"/v1/jobs/{job_id}/events").text
        assert events.count("event: state") >= 2
        assert events.count('"state": "running"') + events.count('"state":"running"') == 1


# The CLI talks to the REST API only: the backends behind it are the other tests' concern.
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_cli_submit_wait_status_download(stack: Any, tmp_path: Path) -> None:
    stack.start_worker("worker")
    dataset_id = make_dataset(stack.client)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(tiny_spec(dataset_id, "cli", schedule={"epochs": 1, "batch_size": 8}))
    )
    env = {**stack.env, "TID_URL": stack.client.url}
    env["TID_API_KEY"] = stack.client.http.headers["Authorization"].removeprefix("Bearer ")

    def tid(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    submitted = tid("submit", str(spec), "--wait")
    assert submitted.returncode == 0, submitted.stderr + stack.log("worker")
    job_id = submitted.stdout.strip()
    # live progress goes to stderr: every state change, the evaluation, a final summary
    progress = submitted.stderr
    assert progress.index("state running") < progress.index("epoch 1: AP")
    assert progress.index("epoch 1: AP") < progress.index("state succeeded")
    assert progress.splitlines()[-1].startswith(f"{job_id} succeeded  step 2/2")
    watched = tid("watch", job_id)  # a finished job: its whole history, then the summary
    assert watched.returncode == 0 and "state succeeded" in watched.stderr
    listed = tid("ls")
    assert listed.returncode == 0
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert row.split()[1:6] == ["cli", "none", "succeeded", "1x1", "2/2"]
    compared = tid("compare", job_id)
    assert compared.returncode == 0
    header, _, line = compared.stdout.splitlines()[:3]
    assert header.split() == ["job", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert line.startswith(f"none:{job_id[:5]}")
    logs = tid("logs", job_id, "--tail", "2")
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 2
    assert "epoch 1: AP" in logs.stdout.splitlines()[-1]
    again = tid("cancel", job_id)
    assert again.returncode == 1 and f"409 job {job_id} is already succeeded" in again.stderr
    status = json.loads(tid("status", job_id).stdout)
    assert status["state"] == "succeeded" and status["step"] == 2
    out = tmp_path / "w.safetensors"
    downloaded = tid("download", job_id, "-o", str(out))
    assert downloaded.returncode == 0, downloaded.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() in downloaded.stdout
    bad = tid("status", "0" * 32)
    assert bad.returncode == 1 and "404" in bad.stderr

    # uploads: the student just downloaded (a detector), an ImageNet-style backbone file, a
    # COCO 2017-style zip; --wait reports each worker's verdict
    uploaded = tid("upload-model", str(out), "--name", "mine", "--wait")
    assert uploaded.returncode == 0, uploaded.stderr
    assert json.loads(uploaded.stderr)["meta"]["arch"] == "fcos"
    torch.save(resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    uploaded = tid("upload-model", str(tmp_path / "resnet18-f37072fd.pth"), "--name", "r18")
    assert uploaded.returncode == 0, uploaded.stderr
    model = stack.client.wait(
        lambda: stack.client.request("GET", f"/v1/models/{uploaded.stdout.strip()}"),
        done=lambda m: m["state"] != "pending",
        timeout=120,
    )
    assert (model["state"], model["meta"]) == ("ready", {"backbone": "resnet18"})
    refused = tid("upload-model", str(spec), "--name", "x")
    assert refused.returncode == 1 and "or .safetensors file, got 'spec.json'" in refused.stderr

    coco = with_split_names(
        generate_shapes(tmp_path / "shapes", num_train=4, num_val=2, image_size=64, seed=1),
        tmp_path / "coco",
        COCO_2017,
    )
    archive = shutil.make_archive(str(tmp_path / "coco"), "zip", coco)
    splits = ["--train-split", "train2017", "--val-split", "val2017"]
    uploaded = tid("upload-dataset", archive, "--name", "coco", *splits, "--wait")
    assert uploaded.returncode == 0, uploaded.stderr
    assert json.loads(uploaded.stderr)["num_train"] == 4
    unsplit = tid("upload-dataset", archive, "--name", "coco", "--wait")
    assert unsplit.returncode == 1 and "instances_train.json" in unsplit.stderr
