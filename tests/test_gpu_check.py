"""bench/gpu_check.py in its CPU mode: the steps' own logic, quickly, and what summary.json records."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import gpu_check


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    argv = [
        "--device", "cpu", "--out", str(out), "--part", "all", "--methods", "gradcam", "--dtypes", "float32",
        "--race-seconds", "1", "--concurrency", "4", "--max-mp", "0.3", "--memory-requests", "4",
    ]  # fmt: skip
    code = gpu_check.main(argv)
    result = json.loads((out / "summary.json").read_text())
    result["exit_code"] = code
    return result


def test_summary_records_every_step_in_order(summary):
    assert list(summary["steps"]) == list(gpu_check.STEPS)
    assert summary["device"] == "cpu" and summary["passed"] is True and summary["exit_code"] == 0
    for name in ("pytest_gpu", "bench_engine", "bench_load"):
        assert summary["steps"][name]["status"] == "skipped"
        assert summary["steps"][name]["reason"] == "skipped: no CUDA"


def test_environment_reports_versions_and_missing_modules(summary):
    env = summary["steps"]["environment"]
    assert env["status"] == "pass" and env["missing_modules"] == []
    assert env["torch"] and env["torchvision"] and env["cuda_available"] in (True, False)


def test_sweep_covers_layers_and_counterfactual(summary):
    sweep = summary["steps"]["sweep"]
    assert sweep["status"] == "pass" and sweep["cells"] == 6 and sweep["failed"] == []
    cells = {(r["layers"], r["counterfactual"]) for r in sweep["rows"]}
    assert cells == {(layers, cf) for layers in ("default", "earlier", "fusion") for cf in (False, True)}
    assert sweep["layers"]["earlier"] != sweep["layers"]["default"]
    for row in sweep["rows"]:
        assert row["finite"] and row["device"] == "cpu" and row["min_spearman"] >= 0.999999  # float32 vs itself


def test_race_compares_every_answer_with_its_baseline(summary):
    race = summary["steps"]["race"]
    assert race["status"] == "pass" and race["mismatches"] == 0 and race["errors"] == 0
    assert race["requests"] >= len(race["images"])
    assert {"0.1MP", "0.1MP-progressive", "0.1MP-gray", "0.3MP"} <= set(race["images"])
    assert race["worst"]["relative"] <= gpu_check.RACE_TOLERANCE


def test_broken_jpegs_get_400_and_the_next_good_one_200(summary):
    cases = summary["steps"]["corrupt_jpeg"]["cases"]
    assert set(cases) == {"truncated_half", "truncated_90", "header_only", "zeroed_huffman"}
    assert all(c["status"] == 400 and c["next_good_status"] == 200 for c in cases.values())


def test_memory_step_reports_a_peak(summary):
    memory = summary["steps"]["memory"]
    assert memory["status"] == "pass" and memory["statuses"] == [200] and memory["requests"] == 4
    assert 0 < memory["peak_rss_gib"] <= memory["limit_gib"]


def test_a_failing_or_crashing_step_fails_the_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "environment", lambda args: {"ok": False, "why": "x"})
    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "race", lambda args: 1 / 0)
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "environment", "race", "bench_load"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and summary["passed"] is False
    assert summary["steps"]["environment"] == {"status": "fail", "why": "x", "seconds": 0.0}
    assert summary["steps"]["race"]["status"] == "error" and "ZeroDivisionError" in summary["steps"]["race"]["error"]
    assert summary["steps"]["bench_load"]["status"] == "skipped"


def test_race_set_and_broken_jpegs():
    photos = gpu_check.race_set(1.0)
    assert set(photos) == {f"{mp}MP{kind}" for mp in (0.1, 1.0) for kind in ("", "-progressive", "-gray")}
    assert all(body[:2] == b"\xff\xd8" for body in photos.values())
    broken = gpu_check.broken_jpegs(photos["0.1MP"])
    assert len(broken["truncated_half"]) < len(photos["0.1MP"]) and broken["header_only"].endswith(b"\xff\xd9")


def test_shell_script_documents_its_modes():
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], capture_output=True, text=True)
    assert result.returncode == 2
    for mode in ("prepare", "run checks", "run bench", "run cpu"):
        assert mode in result.stdout


def test_onnxruntime_step_checks_the_runtime_layer_against_eager(summary):
    """On CPU the step runs ONNX Runtime's CPU provider; on a GPU host without onnxruntime-gpu it is skipped."""
    step = summary["steps"]["onnxruntime"]
    assert step["status"] == "pass" and "CPUExecutionProvider" in step["providers"]
    assert "onnxruntime" not in step["not_used"] and step["runtime"].startswith("batch 1: ")
    assert step["max_logit_error"] <= 1e-3 and step["max_map_error"] <= 1e-3
