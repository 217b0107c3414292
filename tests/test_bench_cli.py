"""`see-ray bench quality` argument checks: the OOD tasks must be out of distribution (never trained on, never
used as negatives), and unknown names are refused before anything is loaded into a model."""

from __future__ import annotations

import pytest

from see_ray.cli import main
from test_data import superni


@pytest.fixture
def bench_dir(tmp_path):
    names = ["task001_a", "task002_b", "task003_c", "task004_d"]
    for i, n in enumerate(names):
        d = tmp_path / n
        d.mkdir()
        superni(d / "train.json", 6, definition=f"Definition {i}.")
        superni(d / "test.json", 3, definition=f"Definition {i}.", start=100)
    (tmp_path / "order.txt").write_text("\n".join(names) + "\n")
    return tmp_path


def run(bench_dir, *args):
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", "--data", str(bench_dir), "--tasks", "2", *args])
    return str(e.value)


def test_ood_task_in_the_sequence_is_refused(bench_dir):
    msg = run(bench_dir, "--ood-tasks", "task002_b")
    assert "--ood-tasks" in msg and "task002_b" in msg and "not out of distribution" in msg


def test_ood_task_in_the_general_pool_is_refused(bench_dir):
    msg = run(bench_dir, "--general-pool-tasks", "task003_c", "--ood-tasks", "task003_c,task004_d")
    assert "task003_c" in msg and "not out of distribution" in msg


def test_unknown_ood_task_is_refused(bench_dir):
    assert "unknown task 'task999_x'" in run(bench_dir, "--general-pool-tasks", "builtin", "--ood-tasks", "task999_x")
