"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the whole
service: log in, submit a job from the page, watch it succeed with plots that have points,
download the student, compare. Screenshots land in the test's temp dir (and in
`$TID_SCREENSHOT_DIR` when set: that is how the README's picture is made)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS
from prerequisites import missing
from service_jobs import make_dataset, teacher_of, tiny_spec

from tid_core.events import read_events
from tid_core.models import load_student

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("TID_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["TID_SCREENSHOT_DIR"]) / path.name)


def points(page: Any, title: str) -> int:
    return int(page.get_attribute(f'.chart[data-title="{title}"]', "data-points"))


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_dashboard_login_submit_live_plots_download_compare(stack: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if CHROMIUM is None:
        missing("Debian's chromium is not installed")

    stack.start_worker("worker")
    dataset_id = make_dataset(stack.client)
    key = stack.client.http.headers["Authorization"].removeprefix("Bearer ")
    teacher = stack.client.submit(tiny_spec(dataset_id, "teacher"))  # over the API
    assert stack.client.wait_job(teacher["id"], timeout=300)["state"] == "succeeded"
    spec = tiny_spec(  # from the page: 2 epochs of 4 steps, an evaluation after each; an lr
        dataset_id,  # whose ticks (0, 5e-4, ..., 2e-3) need more than 3 decimals to tell apart
        "tid-student",
        schedule={"lr": 0.002},
        teacher=teacher_of(teacher["id"]),
        distill={"method": "tid", "distill_warmup_iters": 2},
    )

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.set_default_timeout(30_000)
        page.goto(stack.client.url + "/")

        page.fill("#api-key", "tid_wrong_key")
        page.click("#login-form button")
        expect(page.locator("#login-error")).to_contain_text("401 invalid or revoked API key")
        page.fill("#api-key", key)
        page.click("#login-form button")
        expect(page.locator("#jobs")).to_be_visible()

        page.fill("#spec", json.dumps(spec))
        page.click("#submit-form button")
        page.wait_for_url("**/#/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        # until it is final, the ETA `tid watch` shows: a time once live step events set a pace
        expect(page.locator("#eta")).to_be_visible()
        expect(page.locator("#eta")).to_have_text(re.compile(r"^\d+:\d\d:\d\d$"), timeout=240_000)
        expect(page.locator('h1 .state[data-state="succeeded"]')).to_be_visible(timeout=240_000)
        expect(page.locator("#eta")).to_have_count(0)  # a final job has no ETA
        page.wait_for_function(  # the last events arrive over the stream and are drawn
            "document.querySelector('.chart[data-title=\"mAP per evaluation\"]')"
            ".dataset.points === '2'"
        )
        assert points(page, "loss terms") == 8  # log_every 1: a point per step
        assert points(page, "learning rate") == 8
        # the lr axis's tick labels differ (uPlot's default gave 0, 0.001, 0.001, 0.002, 0.002)
        ticks = json.loads(page.get_attribute('.chart[data-title="learning rate"]', "data-y-ticks"))
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
        assert points(page, "TID key / weak area fractions") == 8
        expect(page.locator("#timeline")).to_contain_text("succeeded")
        expect(page.locator("#timeline")).to_contain_text("attempt 1 started at step 0")
        expect(page.locator("#logs")).to_contain_text("epoch 2: AP")
        expect(page.locator("#cancel")).to_be_disabled()
        # the distillation's gradient ratio, and a warning line for each warning event
        expect(page.locator("#grad-ratio")).to_have_text(re.compile(r"^\d+\.\d\d$"))
        events = read_events(stack.settings.jobs_dir / job_id / "events.jsonl")
        warnings = sum(e["type"] == "warning" for e in events)
        expect(page.locator("#warnings .warning")).to_have_count(warnings)
        shot(page, tmp_path, "job-page")

        with page.expect_download() as download:
            page.click('button[data-artifact="student.safetensors"]')
        saved = tmp_path / "student.safetensors"
        download.value.save_as(saved)
        etag = stack.client.http.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors")
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == etag.headers["etag"].strip('"')
        _, meta = load_student(saved)
        assert meta.num_classes == 5

        page.goto(stack.client.url + "/#/")
        for job in (teacher["id"], job_id):
            row = page.locator(f'tr[data-job="{job}"]')
            expect(row.locator(".state")).to_have_text("succeeded")
            row.locator("input[type=checkbox]").check()
        shot(page, tmp_path, "jobs")
        page.click("text=Compare selected")
        expect(page.locator("#compare")).to_contain_text("tid-student (tid)")
        expect(page.locator("#compare")).to_contain_text("teacher (none)")
        assert points(page, "mAP (AP) per epoch") == 2  # epochs 1 and 2, a curve per job
        shot(page, tmp_path, "compare")
        browser.close()
    assert (tmp_path / "job-page.png").stat().st_size > 10_000
