"""The capacity-gap protocol's parts that need no training: its settings and grid, its
statistics, and the keys of its run records (the protocol itself: test_accuracy_quick.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import accuracy
from bench.accuracy_jobs import METHODS, TEACHER_SEED, TUNING_SEED, Job, job_spec
from bench.capacity import (
    ALONE_AT_TEACHER_BUDGET,
    DEFAULTS,
    SETTINGS,
    TUNED,
    Grid,
    RunCache,
    epoch_means,
    keep_half,
    paired_difference,
    recorded_teacher,
    report_table,
    setting_recipe,
    sized,
    tuning_table,
    tuning_trials,
    weights_digest,
)
from bench.capacity_diagnosis import distill_fall
from tid_core.models import BACKBONES, DetectorMeta, build_detector, load_checked, save_weights


def result(ap: float) -> dict[str, Any]:
    return {"metrics": {"AP": ap}, "seconds": 1.0}


def test_the_bootstrap_interval_brackets_the_mean_and_reproduces() -> None:
    a, b = [21.0, 23.0, 22.0, 25.0, 24.0], [20.0, 20.0, 21.0, 21.0, 22.0]
    diff = paired_difference(a, b)
    assert diff["mean"] == pytest.approx(2.2)
    assert min(x - y for x, y in zip(a, b, strict=True)) <= diff["low"] < diff["mean"]
    assert diff["mean"] < diff["high"] <= max(x - y for x, y in zip(a, b, strict=True))
    assert paired_difference(a, b) == diff  # a fixed generator: the same table every time
    # a constant difference has no spread; the pairing removes what the seeds share
    assert paired_difference([5.0, 9.0, 1.0], [4.0, 8.0, 0.0]) == {
        "mean": 1.0,
        "low": 1.0,
        "high": 1.0,
    }


def test_every_method_gets_the_same_number_of_trials_its_defaults_among_them() -> None:
    trials = tuning_trials(quick=False)
    counts = {m: sum(method == m for method, _ in trials.values()) for m in TUNED}
    assert set(counts.values()) == {4}
    # three loss weights at the knob's first value, its other value at the second weight
    assert Grid("gamma", (0.5, 1.0), (0.5, 8.0, 32.0)).trials() == [
        (0.5, 0.5),
        (8.0, 0.5),
        (32.0, 0.5),
        (8.0, 1.0),
    ]
    for method, grid in TUNED.items():
        blocks = [block for m, block in trials.values() if m == method]
        assert all(block["method"] == METHODS[method]["method"] for block in blocks)
        defaults = {"loss_weight": DEFAULTS.loss_weight, grid.knob: getattr(DEFAULTS, grid.knob)}
        assert any(defaults.items() <= block.items() for block in blocks), method
    assert len(tuning_trials(quick=True)) == len(TUNED)


def test_the_tuning_table_locks_each_methods_best_trial() -> None:
    trials = tuning_trials(quick=False)
    ap = {name: float(i) for i, name in enumerate(trials)}  # the last trial of each is best
    results = {"none": [result(3.0)], **{name: [result(v)] for name, v in ap.items()}}
    table = tuning_table(results, trials)
    for method in TUNED:
        assert table["locked"][method] == [t for t in trials if trials[t][0] == method][-1]
    first = next(iter(trials))  # fitnet at its defaults
    assert table["trials"][first] == 0.0 and table["none_AP"] == 3.0
    assert set(table["defaults_vs_alone"]) == set(TUNED)


def test_the_report_pairs_seeds_and_picks_the_best_baseline_by_mean() -> None:
    aps = {
        "none": [10.0, 12.0],
        ALONE_AT_TEACHER_BUDGET: [18.0, 20.0],
        **{m: [11.0, 13.0] for m in TUNED},
    }
    aps["pkd"] = [14.0, 16.0]
    results = {row: [result(ap) for ap in values] for row, values in aps.items()}
    blocks = {m: METHODS[m] for m in TUNED}
    report = report_table(results, 31.0, blocks)
    assert report["best_baseline"] == "pkd"
    tid = report["rows"]["tid"]
    assert tid["AP_per_seed"] == [11.0, 13.0] and tid["AP"] == 12.0
    assert tid["vs_alone"]["mean"] == 1.0 and tid["vs_best_baseline"]["mean"] == -3.0
    assert tid["gap_closed"] == pytest.approx(1 / 20)  # (12 - 11) / (31 - 11)
    assert tid["gap_closed_teacher_budget"] == pytest.approx(-7 / 12)  # (12 - 19) / (31 - 19)
    assert report["rows"]["pkd"]["vs_best_baseline"] is None
    assert report["rows"]["none"]["vs_alone"] is None
    # no gap to close when the student alone at the teacher's budget beats the teacher
    assert report_table(results, 15.0, blocks)["rows"]["tid"]["gap_closed_teacher_budget"] is None


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_is_a_valid_teacher_and_student(name: str) -> None:
    recipe = setting_recipe(SETTINGS[name], quick=False)
    assert {recipe.teacher["backbone"], recipe.student["backbone"]} <= set(BACKBONES)
    teacher = {**recipe.teacher, "weights": {"path": "teacher.safetensors"}}
    for block in (METHODS["none"], *(block for _, block in tuning_trials(quick=False).values())):
        job_spec(
            "check",
            recipe.student,
            {"path": "data"},
            recipe=recipe,
            epochs=recipe.student_epochs,
            seed=1,
            device="cpu",
            distill=block,
            teacher=teacher if block["method"] != "none" else None,
        )  # validates
    optimizers = {SETTINGS[n].optimizer for n in SETTINGS}
    archs = {setting_recipe(SETTINGS[n], quick=False).student["arch"] for n in SETTINGS}
    assert optimizers == {"sgd", "adamw"} and archs == {"fcos", "retinanet"}
    assert TEACHER_SEED != TUNING_SEED


def test_a_gpus_sizes_are_the_cpu_tables_at_twice_the_input_size() -> None:
    cpu, gpu = (sized(argparse.Namespace(quick=False, sizes=s)) for s in ("cpu", "gpu"))
    assert (cpu.image_size, gpu.image_size) == (128, 256)
    assert dataclasses.replace(gpu, image_size=128) == cpu
    assert sized(argparse.Namespace(quick=True, sizes="gpu")).image_size == 64  # quick wins
    for name, setting in SETTINGS.items():
        recipe = setting_recipe(setting, quick=False, gpu=True)
        assert recipe.image_size == 256 and recipe.optimizer == setting.optimizer, name
    with pytest.raises(SystemExit) as refused:  # only the capacity protocol has sizes
        accuracy.main(["--sizes", "gpu"])
    assert refused.value.code == 2  # argparse's usage error


def test_a_record_is_keyed_by_the_data_folders_name_and_the_teachers_weights(
    tmp_path: Path,
) -> None:
    recipe = setting_recipe(SETTINGS["main"], quick=True)

    def file(data: str, weights: str, digest: str) -> Path:
        teacher = {**recipe.teacher, "weights": {"path": weights}}
        spec = job_spec(
            "bench-tid-s1",
            recipe.student,
            {"path": data, "input_size": 64},
            recipe=recipe,
            epochs=1,
            seed=1,
            device="cpu",
            distill=METHODS["tid"],
            teacher=teacher,
        )
        cache = RunCache(tmp_path)
        path = cache.file("tid-s1", spec, {"teacher": digest})
        assert cache.has([Job("tid", "tid-s1", spec, tmp_path)], digest) == path.exists()
        return path

    first = file("/a/var/scenes-v1-8-4-64px-seed0", "/a/var/teacher/student.safetensors", "d1")
    # another session's --out: the same record
    assert file("/b/out/scenes-v1-8-4-64px-seed0", "/b/out/t/student.safetensors", "d1") == first
    # other data, another teacher: other records
    assert file("/a/var/scenes-v1-16-4-64px-seed0", "/a/t.safetensors", "d1") != first
    assert file("/a/var/scenes-v1-8-4-64px-seed0", "/a/t.safetensors", "d2") != first


def test_the_kept_teacher_is_its_weights_at_half_precision_and_loads_as_the_teacher(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_detector(arch="fcos", backbone="resnet18", num_classes=3, fpn_channels=64)
    meta = DetectorMeta("fcos", "resnet18", 3, 64, 64, ["a", "b", "c"])
    save_weights(model, meta, tmp_path / "student.safetensors")
    kept = tmp_path / "teacher-key.safetensors"
    keep_half(tmp_path / "student.safetensors", kept)

    assert kept.stat().st_size < 0.6 * (tmp_path / "student.safetensors").stat().st_size
    loaded = load_checked(
        kept,
        arch="fcos",
        backbone="resnet18",
        num_classes=3,
        fpn_channels=64,
        image_size=64,
        class_names=["a", "b", "c"],
    )  # its metadata kept: checked against the student's spec as a teacher's file is
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        want = tensor.half().to(tensor.dtype) if tensor.is_floating_point() else tensor
        assert got.dtype == tensor.dtype and torch.equal(got, want), name
    assert weights_digest(kept) != weights_digest(tmp_path / "student.safetensors")


def test_a_recorded_teacher_without_its_kept_weights_is_refused(tmp_path: Path) -> None:
    recipe = setting_recipe(SETTINGS["main"], quick=True)
    spec = job_spec(
        "bench-teacher",
        recipe.teacher,
        {"path": "data", "input_size": 64},
        recipe=recipe,
        epochs=1,
        seed=TEACHER_SEED,
        device="cpu",
    )
    cache = RunCache(tmp_path)
    cache.put(cache.file("teacher", spec, {}), {"weights_digest": "d1", "curve": [1.0]})
    with pytest.raises(SystemExit, match="is missing or other"):
        recorded_teacher(cache, spec, tmp_path / "run")  # and nothing is trained
    model = build_detector(arch="fcos", backbone="resnet18", num_classes=3, fpn_channels=64)
    save_weights(model, DetectorMeta("fcos", "resnet18", 3, 64, 64), cache.kept(spec))
    with pytest.raises(SystemExit, match="is missing or other"):  # other weights than recorded
        recorded_teacher(cache, spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    record = {"weights_digest": weights_digest(cache.kept(spec)), "curve": [1.0]}
    cache.put(cache.file("teacher", spec, {}), record)
    assert recorded_teacher(cache, spec, tmp_path / "run") == record  # the kept weights


def test_a_records_trajectory_averages_each_term_per_epoch() -> None:
    steps = [
        {"epoch": 0, "losses": {"loss": 4.0, "tid_key": 1.0}, "stats": {"key_frac": 0.2}},
        {"epoch": 0, "losses": {"loss": 2.0, "tid_key": 3.0}, "stats": {}},
        {"epoch": 1, "losses": {"loss": 1.0}, "stats": {"key_frac": 0.4}},
    ]
    assert epoch_means(steps) == {
        "key_frac": [0.2, 0.4],
        "loss": [3.0, 1.0],
        "tid_key": [2.0, None],
    }


def test_the_distillation_fall_is_the_terms_last_epoch_over_their_first() -> None:
    record = {"per_epoch": {"tid_key": [2.0, 1.0, 0.5], "tid_rest": [2.0, None, 0.5], "x": [9.0]}}
    assert distill_fall(record, ["tid_key", "tid_rest"]) == pytest.approx(0.25)
    assert distill_fall({"per_epoch": {"fitnet": [3.0]}}, ["fitnet"]) is None
    assert distill_fall({}, ["pkd"]) is None
