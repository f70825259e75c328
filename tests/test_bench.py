"""The benchmark harness (``fedtensor.bench``): BD-rate against worked examples, the PSNR-target
search, a small resumable run with its outputs, and the command line."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedtensor.baselines import ParamSpace, Trial, find_smallest
from fedtensor.bench import BenchConfig, bd_psnr, bd_rate, load_cells, run_bench
from fedtensor.bench import harness
from fedtensor.bench.cli import BenchUsageError, normalize_args
from fedtensor.errors import VolumeError
from fedtensor.io import Volume, read_volume, write_volume

# ------------------------------------------------------------------------------------------ BD-rate


def test_bd_rate_constant_ratio_is_exact():
    """B spends 0.8× A's rate at every PSNR: BD-rate = −20 % whatever the fit."""
    psnr = [30.0, 34.0, 38.0, 42.0]
    rate_a = [100.0, 200.0, 400.0, 800.0]
    assert bd_rate(rate_a, psnr, [0.8 * r for r in rate_a], psnr) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate(rate_a, psnr, rate_a, psnr) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_worked_example_by_hand():
    """Worked example, integrated by hand.

    Anchor A: ln R_A(D) = ln 0.1 + 0.1·(D − 30), measured at D = 30, 33, 36, 39.
    Test B:   ln R_B(D) = ln R_A(D) + 0.02·(D − 31), measured at D = 31, 34, 37, 40.
    Both are polynomials of degree ≤ 3, so the cubic fits are exact. The curves overlap on [31, 39],
    where the mean of 0.02·(D − 31) is 0.02·4 = 0.08, hence BD-rate = e^0.08 − 1 = +8.3287 %.
    Clipped to [35, 39] the mean is 0.02·6 = 0.12: e^0.12 − 1 = +12.7497 %.
    """
    da = np.array([30.0, 33.0, 36.0, 39.0])
    db = np.array([31.0, 34.0, 37.0, 40.0])
    ra = 0.1 * np.exp(0.1 * (da - 30))
    rb = 0.1 * np.exp(0.1 * (db - 30) + 0.02 * (db - 31))
    assert bd_rate(ra, da, rb, db) == pytest.approx(100 * (math.exp(0.08) - 1), abs=1e-6)
    assert bd_rate(ra, da, rb, db) == pytest.approx(8.3287, abs=1e-4)
    assert bd_rate(ra, da, rb, db, lo=35, hi=45) == pytest.approx(100 * (math.exp(0.12) - 1), abs=1e-6)
    # swapping anchor and test inverts the ratio
    assert bd_rate(rb, db, ra, da) == pytest.approx(100 * (math.exp(-0.08) - 1), abs=1e-6)


def test_bd_rate_cubic_log_rate_and_three_points():
    """A genuinely cubic ln R(D) is reproduced exactly; with 3 points the fit is the exact quadratic."""
    d = np.array([40.0, 43.0, 47.0, 50.0])
    ln_ra = 0.002 * (d - 40) ** 3 - 0.01 * (d - 40) ** 2 + 0.12 * (d - 40) - 1.0
    assert bd_rate(np.exp(ln_ra), d, np.exp(ln_ra - 0.1), d) == pytest.approx(100 * (math.exp(-0.1) - 1), abs=1e-6)
    d3 = np.array([40.0, 45.0, 50.0])
    ln3 = 0.01 * (d3 - 40) ** 2 + 0.1 * (d3 - 40)
    assert bd_rate(np.exp(ln3), d3, 0.5 * np.exp(ln3), d3) == pytest.approx(-50.0, abs=1e-9)


def test_bd_rate_degenerate_cases():
    assert bd_rate([1, 2], [30, 35], [1, 2], [40, 45]) is None  # no overlap
    assert bd_rate([1], [30], [1, 2], [30, 35]) is None  # one point
    assert bd_rate([1, 2, 4], [30, 35, 40], [1, 2, 4], [30, 35, 40], lo=41, hi=50) is None
    assert bd_rate([1, 2, float("nan"), 4], [30, 35, 37, 40], [1, 2, 4], [30, 35, 40]) == pytest.approx(0, abs=1e-9)
    inf = float("inf")  # a codec whose every point is exact (a constant or tiny volume): no curve, no crash
    assert bd_rate([1, 2], [30, 35], [3, 3], [inf, inf]) is None and bd_rate([3], [inf], [1, 2], [30, 35]) is None
    assert bd_rate([], [], [1, 2], [30, 35]) is None


def test_bd_psnr_shift():
    rate = [0.25, 0.5, 1.0, 2.0]
    psnr = [38.0, 41.0, 44.0, 47.0]
    assert bd_psnr(rate, psnr, rate, [p + 0.5 for p in psnr]) == pytest.approx(0.5, abs=1e-9)


# ------------------------------------------------------------------------------------------ search


def _codec(psnr_of, bytes_of=None):
    calls = []

    def evaluate(p):
        calls.append(p)
        return Trial(p, psnr_of(p), None if bytes_of is None else bytes_of(p))

    return evaluate, calls


def test_search_finds_largest_feasible_step():
    """PSNR = 60 − 20·log10(step): the answer for 45 dB is step* = 10^0.75; bytes fall as the step grows."""
    space = ParamSpace(1e-4, 1e4, log=True, increasing=False, guess=lambda t: 1.0)
    evaluate, calls = _codec(lambda p: 60 - 20 * math.log10(p), lambda p: int(1e6 / p))
    cache: dict = {}
    r = find_smallest(evaluate, space, 45.0, cache, tol_db=0.03)
    assert r.reached and 45.0 <= r.psnr <= 45.03
    assert r.param <= 10**0.75 and r.nbytes == min(t.nbytes for t in cache.values() if t.psnr >= 45)
    assert r.evaluations <= 8  # coarse (guess + extrapolation) then fine: well inside the 14-step budget
    n_first = len(calls)
    r50 = find_smallest(evaluate, space, 50.0, cache)  # the shared cache gives a head start
    assert r50.reached and 50.0 <= r50.psnr <= 50.03 and len(calls) - n_first <= 6


def test_search_increasing_linear_space_and_unreachable():
    space = ParamSpace(5.0, 150.0, log=False, increasing=True)  # e.g. an OpenJPEG level
    evaluate, _ = _codec(lambda lv: min(lv, 80.0) - 3.0, lambda lv: int(lv * 100))
    r = find_smallest(evaluate, space, 45.0, {})
    assert r.reached and 45.0 <= r.psnr <= 45.03 and r.param == pytest.approx(48.0, abs=0.05)
    r = find_smallest(evaluate, space, 90.0, {})  # the codec tops out at 77 dB
    assert not r.reached and r.param is None


def test_search_step_function_and_lazy_size():
    """A ZFP-like PSNR staircase: the cheapest feasible stair is chosen; sizes are computed lazily."""
    space = ParamSpace(1e-3, 1e3, log=True, increasing=False)
    stairs = lambda p: 80 - 6.02 * math.floor(math.log2(p))  # noqa: E731
    evaluate, _ = _codec(stairs)
    sized = []
    r = find_smallest(evaluate, space, 45.0, {}, size=lambda p: sized.append(p) or int(1e6 / p), max_steps=14)
    assert r.reached and r.psnr >= 45.0 and r.psnr - 45.0 < 6.03
    assert r.nbytes is not None and 1 <= len(sized) <= 2


def test_search_prefers_fewest_bytes_when_rate_is_not_monotone():
    space = ParamSpace(1.0, 100.0, log=True, increasing=False)
    cache = {10.0: Trial(10.0, 46.0, 900), 20.0: Trial(20.0, 45.2, 1000), 40.0: Trial(40.0, 44.0, 500)}
    r = find_smallest(lambda p: Trial(p, 50 - 5 * math.log10(p) * 2.3, 1000), space, 45.0, cache, max_steps=0)
    assert r.nbytes == 900 and r.param == 10.0


# ------------------------------------------------------------------------------------------ harness


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory, data_dir) -> Path:
    v = read_volume(data_dir / "ct_abdomen.nii.gz")
    crop = Volume(np.ascontiguousarray(v.data[45:77, 40:72, 48:64]), v.spacing, v.affine)
    path = tmp_path_factory.mktemp("vol") / "tiny_ct.nii.gz"
    write_volume(crop, path)
    return path


def test_run_bench_outputs_and_resume(tiny_volume, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    codecs = ["fedtensor", "jpeg2000", "sz3", "zstd"]
    cfg = BenchConfig([tiny_volume], targets=[40, 45], codecs=codecs, out=out, jobs=1)
    summary = run_bench(cfg)
    for name in ("cells.jsonl", "results.csv", "results.json", "bd_rate.md", "summary.md",
                 "rd_tiny_ct.png", "storage_45dB.png", "panel_tiny_ct.png"):
        assert (out / name).exists(), name
    for png in out.glob("*.png"):
        assert png.stat().st_size < 200_000
    cells = load_cells(out)
    assert len(cells) == 3 * 2 + 1
    for c in cells.values():
        assert c["status"] == "ok", c
        if c["target"] == "lossless":
            assert c["psnr"] == "inf" and c["max_error"] == 0
        else:
            assert float(c["psnr"]) >= float(c["target"])  # every scored cell reached its target
            assert 0 < c["ssim"] <= 1 and c["bpv"] > 0 and c["encode_mvox_s"] > 0 and c["peak_mem_bytes"] >= 0
    bd = summary["bd_rate"]["tiny_ct"]
    assert set(bd) == {"jpeg2000", "sz3"} and all(v is not None for v in bd.values())
    data = json.loads((out / "results.json").read_text())
    assert data["bd_rate"] == json.loads(json.dumps(summary["bd_rate"]))
    assert "| tiny_ct |" in (out / "bd_rate.md").read_text()
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["volume", "codec", "target", "status", "bytes", "bpv", "ratio", "psnr"]

    # resume: nothing is recomputed, and a new target only adds its own cells
    def fail(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(harness, "run_cells", fail)
    run_bench(BenchConfig([tiny_volume], targets=[40, 45], codecs=codecs, out=out, jobs=1, figures=False))
    monkeypatch.undo()
    ran = []
    real = harness.run_cells
    monkeypatch.setattr(harness, "run_cells", lambda spec, codec, targets, repeat=1: ran.append((codec, list(targets)))
                        or real(spec, codec, targets, repeat))
    summary = run_bench(BenchConfig([tiny_volume], targets=[40, 45, 50], codecs=["sz3", "zstd"], out=out, jobs=1,
                                    figures=False))
    assert ran == [("sz3", [50.0])]
    # no earlier run's report stands next to this one's: no anchor, no BD-rate table; no figures asked for
    assert not (out / "bd_rate.md").exists() and not list(out.glob("*.png"))
    assert summary["files"] == ["results.csv", "results.json", "summary.md"]
    # a run at fewer targets reports only its own (the others' cells stay stored for later runs)
    monkeypatch.setattr(harness, "run_cells", fail)
    summary = run_bench(BenchConfig([tiny_volume], targets=[45], codecs=["sz3", "zstd"], out=out, jobs=1,
                                    figures=False))
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert sorted((r["codec"], r["target"]) for r in rows) == [("sz3", "45"), ("zstd", "lossless")]
    assert len(summary["cells"]) == 2 and len(load_cells(out)) == 2 + 2 + 3 + 1  # fedtensor, jpeg2000, sz3, zstd


def test_cells_measured_by_other_code_are_measured_again(tiny_volume, tmp_path, monkeypatch):
    """A stored cell stands only for the codec's version (fedtensor's includes its source digest)."""
    from fedtensor.baselines import get_baseline
    from fedtensor.baselines.fedtensor_codecs import source_digest

    monkeypatch.delenv("FEDTENSOR_WORKERS", raising=False)
    assert get_baseline("fedtensor").version().endswith(f"(codec {source_digest()})")
    cfg = dict(targets=[45], codecs=["zstd", "sz3"], out=tmp_path, jobs=1, figures=False)
    run_bench(BenchConfig([tiny_volume], **cfg))
    lines = [json.loads(x) for x in (tmp_path / "cells.jsonl").read_text().splitlines()]
    for c in lines:
        if c["codec"] == "zstd":
            c["version"] = "an older zstd"
    (tmp_path / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    ran = []
    real = harness.run_cells
    monkeypatch.setattr(harness, "run_cells", lambda spec, codec, targets, repeat=1: ran.append(
        (codec, list(targets), os.environ.get("FEDTENSOR_WORKERS"))) or real(spec, codec, targets, repeat))
    summary = run_bench(BenchConfig([tiny_volume], **cfg))
    # in this process (one job) fedtensor's entropy coder starts no workers of its own either
    assert ran == [("zstd", ["lossless"], "1")] and "FEDTENSOR_WORKERS" not in os.environ
    assert "in one process" in (tmp_path / "summary.md").read_text() and summary["config"]["in_process"]


def test_csv_keeps_the_sign_of_an_infinite_psnr(tmp_path):
    from fedtensor.bench.report import write_csv

    write_csv(tmp_path / "r.csv", [{"volume": "v", "psnr": -math.inf}, {"volume": "w", "psnr": math.inf},
                                   {"volume": "x", "psnr": math.nan}])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["psnr"] for r in rows] == ["-inf", "inf", "nan"]


def test_unavailable_codec_is_reported(tiny_volume, tmp_path, monkeypatch, capsys):
    import imagecodecs

    monkeypatch.setattr(imagecodecs.SZ3, "available", False, raising=False)
    summary = run_bench(BenchConfig([tiny_volume], targets=[45], codecs=["sz3", "zstd"], out=tmp_path, jobs=1,
                                    figures=False))
    cells = {c["codec"]: c for c in summary["cells"]}
    assert cells["sz3"]["status"] == "unavailable" and "SZ3" in cells["sz3"]["reason"]
    assert cells["zstd"]["status"] == "ok"
    from fedtensor.bench.cli import print_summary

    print_summary(summary, BenchConfig([tiny_volume], targets=[45], codecs=["sz3", "zstd"], out=tmp_path))
    assert f"unavailable: sz3 on tiny_ct — {cells['sz3']['reason']}" in " ".join(capsys.readouterr().out.split())


def test_missed_target_is_never_scored(tiny_volume, tmp_path, monkeypatch):
    """If the final stream decodes below the target (here: a search that lies), the cell is 'missed'."""
    import fedtensor.baselines as fb

    def lying_search(evaluate, space, target, cache=None, **kw):
        return fb.SearchResult(target, space.hi / 4, target + 0.01, 10, 1, 0.0, True)  # a huge error bound

    monkeypatch.setattr(fb, "find_smallest", lying_search)
    summary = run_bench(BenchConfig([tiny_volume], targets=[45], codecs=["sz3"], out=tmp_path, jobs=1, figures=False))
    (cell,) = summary["cells"]
    assert cell["status"] == "missed" and float(cell["psnr"]) < 45 and "ssim" not in cell
    assert summary["bd_rate"] == {} and "missed" in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------------------------------ command line


def test_normalize_args(tiny_volume):
    paths, t, c = normalize_args([str(tiny_volume), "45", "50"], ["40"], None)
    assert paths == [tiny_volume] and t == [40.0, 45.0, 50.0] and c is None
    paths, t, c = normalize_args([str(tiny_volume), "sz3"], ["40,45"], ["jpeg2000"])
    assert t == [40.0, 45.0] and c == ["jpeg2000", "sz3"]
    with pytest.raises(BenchUsageError, match="no such volume"):
        normalize_args([str(tiny_volume), "45"], None, None)
    with pytest.raises(VolumeError, match="input not found: nope.nii.gz"):
        normalize_args([str(tiny_volume), "nope.nii.gz"], None, None)
    with pytest.raises(BenchUsageError, match="unknown codec"):
        normalize_args([str(tiny_volume)], None, ["jpeg3000"])
    with pytest.raises(BenchUsageError, match="between 0 and 400"):
        normalize_args([str(tiny_volume)], ["-3"], None)


def test_cli_bench(tiny_volume, tmp_path):
    from fedtensor_cli.app import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["bench", str(tiny_volume), "--targets", "40", "45", "--codecs", "sz3", "zstd",
                              "--out", str(out), "--jobs", "1", "--no-figures", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.output.strip().splitlines()[-1])
    assert obj["command"] == "bench" and obj["status_counts"] == {"ok": 3}
    cells = {(c["codec"], c["target"]): c for c in obj["cells"]}  # each cell's figures, the rest in results.json
    assert sorted(cells) == [("sz3", 40.0), ("sz3", 45.0), ("zstd", "lossless")]
    assert all(cells["sz3", t]["psnr"] >= t and cells["sz3", t]["bpv"] > 0 for t in (40.0, 45.0))
    assert (out / "results.csv").exists()
    res = runner.invoke(app, ["bench", str(tiny_volume), "--codecs", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown codec" in res.output


def test_search_scan_finds_a_smaller_stream_below_a_non_monotone_crossing():
    """PSNR swings ±1.5 dB as the error bound moves (as SZ3's does), and so does the size: the
    bisection stops at the first crossing; the scan below it finds the smaller stream that still reaches
    the target."""
    def psnr_of(p):
        return 60 - 20 * math.log10(p) + 1.5 * math.sin(40 * math.log10(p))

    def bytes_of(p):
        return int(1e6 / p * (1 - 0.1 * math.sin(40 * math.log10(p))))

    results = {}
    for scan in (0, 24):
        space = ParamSpace(1e-4, 1e4, log=True, increasing=False, guess=lambda t: 1.0, scan=scan)
        evaluate, _ = _codec(psnr_of, bytes_of)
        cache: dict = {}
        results[scan] = find_smallest(evaluate, space, 45.0, cache)
        assert results[scan].reached and results[scan].psnr >= 45.0
    grid = [10 ** (e / 2000) for e in range(0, 4000)]
    best = min(bytes_of(p) for p in grid if psnr_of(p) >= 45.0)
    assert results[24].nbytes < results[0].nbytes
    assert results[24].nbytes <= 1.03 * best  # within a few % of a dense scan's best


def test_jpeg2000_codestreams_carry_no_encoder_comment():
    imagecodecs = pytest.importorskip("imagecodecs")
    from fedtensor.baselines.slicewise import without_comments

    x = (np.random.default_rng(0).normal(size=(48, 40)) * 100 + 1000).astype(np.uint16)
    raw = imagecodecs.jpeg2k_encode(x, level=45.0, codecformat="J2K", reversible=False, bitspersample=12)
    stripped = without_comments(raw)
    assert b"\xff\x64" in raw[:200] and b"\xff\x64" not in stripped[:200] and len(stripped) < len(raw)
    assert np.array_equal(imagecodecs.jpeg2k_decode(stripped), imagecodecs.jpeg2k_decode(raw))
    assert without_comments(b"\x00\x00\x00\x0cjP  ") == b"\x00\x00\x00\x0cjP  "  # a JP2 file: untouched


def test_memory_sampler_counts_workers_but_not_a_forked_image_twice():
    """The benchmarks' peak memory adds the codec's worker processes; a child that has not exec'd yet
    shares this process's pages and must not count them again."""
    import subprocess
    import sys
    script = """
import os, subprocess, sys, time
from fedtensor.bench.memory import _children_rss, current_rss
pid = os.fork()
if pid == 0:
    time.sleep(2)
    os._exit(0)
time.sleep(0.2)
forked = _children_rss()
os.waitpid(pid, 0)
p = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(3)"])
time.sleep(1.5)
spawned, alone = _children_rss(), current_rss(p.pid)
p.wait()
print(forked, spawned, alone, current_rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    forked, spawned, alone, own = map(int, out.stdout.split())
    assert own > 0 and forked == 0
    assert spawned == alone >= 64 << 20


def test_a_not_applicable_cell_stands_only_for_the_code_that_judged_it():
    # fedtensor-lossless was "n/a" on the MR for good, even once the codec coded its scaled integers
    n_a = {"status": "n/a", "reason": "needs integer-valued voxels", "version": "fedtensor 0.1.0 (codec old)"}
    assert not harness.is_done(n_a, "fedtensor 0.1.0 (codec new)")
    assert harness.is_done(n_a, "fedtensor 0.1.0 (codec old)")
    assert not harness.is_done({"status": "n/a", "reason": "x"}, "fedtensor 0.1.0 (codec new)")  # (recorded unversioned)
