"""`bench/overhead.py`: ratios are paired within a round, so drift between rounds cancels; the
kernel count leaves out what launches no kernel."""

from __future__ import annotations

import torch

from bench.overhead import count_ops, ratios


def test_ratios_are_taken_within_each_round_then_the_median_over_rounds() -> None:
    # the baseline (student + teacher) takes 0.2, 0.4, 0.8 s as the machine drifts; FitNet costs
    # 1.1x it in every round. A ratio of medians would say 0.44 / (0.2 + 0.1) = 1.47
    samples = {
        "student": [0.1, 0.3, 0.2],
        "teacher_fwd": [0.1, 0.1, 0.6],
        "fitnet": [0.22, 0.44, 0.88],
        "pkd": [0.2, 0.4, 0.8],
        "tid": [0.24, 0.4, 0.8],  # 1.2, 1.0, 1.0
    }
    result = ratios(samples)
    assert (result["fitnet_ratio"], result["fitnet_ratio_range"]) == (1.1, [1.1, 1.1])
    assert (result["pkd_ratio"], result["pkd_ratio_range"]) == (1.0, [1.0, 1.0])
    assert (result["tid_ratio"], result["tid_ratio_range"]) == (1.0, [1.0, 1.2])
    assert (result["student_ms"], result["teacher_fwd_ms"], result["tid_ms"]) == (200, 100, 400)


def test_kernel_count_on_cpu_counts_the_ops_that_compute_and_not_views() -> None:
    device = torch.device("cpu")
    x = torch.rand(4, 4)

    def views_only(_: int) -> float:
        x.view(16).t().unsqueeze(0).expand(2, 16).narrow(1, 0, 8).detach()
        return 0.0

    def three(_: int) -> float:  # two new tensors and one written in place: three kernels
        y = x + 1
        z = y - x
        z.copy_(y)
        return 0.0

    assert count_ops(views_only, device) == 0
    assert count_ops(three, device) == 3
