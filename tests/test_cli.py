"""The ``fedtensor`` CLI: help, version, error mapping (one ``error:`` line, no traceback), round trips.

Error-path tests need no codec where the check happens before compression (usage errors, missing
input, path rules); round trips use a small smooth synthetic volume to stay fast, plus one run on the
real ``examples/data/ct_head_uint8.nii.gz``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedtensor import __version__
from fedtensor_cli import paths
from fedtensor_cli.app import app, main, rate_target
from fedtensor_cli.errors import UsageFailure

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_HEAD = REPO_ROOT / "examples" / "data" / "ct_head_uint8.nii.gz"
COMMANDS = ("compress", "decompress", "info", "evaluate")

runner = CliRunner()


# ------------------------------------------------------------------------------------------- helpers


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: object) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_error(result, *, code: int | None = None, contains: str | None = None) -> str:
    """Non-zero exit, exactly one ``error: …`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.stdout.strip() == ""
    if contains is not None:
        assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def smooth_volume(shape=(24, 20, 16), dtype=np.int16, seed: int = 0) -> np.ndarray:
    """A smooth CT-like field plus mild noise: compresses well, but not trivially."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0.0, 1.0, n) for n in shape), indexing="ij")
    field = 900.0 * np.sin(3.0 * x + 1.0) * np.cos(2.0 * y) + 700.0 * z - 200.0
    field = field + rng.normal(0.0, 4.0, shape)
    if np.dtype(dtype).kind in "iu":
        field = np.rint(field - (field.min() if np.dtype(dtype).kind == "u" else 0.0))
    return field.astype(dtype)


@pytest.fixture
def vol_path(tmp_path: Path) -> Path:
    p = tmp_path / "vol.npy"
    np.save(p, smooth_volume())
    return p


@pytest.fixture
def ftz_path(tmp_path: Path, vol_path: Path) -> Path:
    out = tmp_path / "vol.ftz"
    result = run("compress", vol_path, out, "--psnr", 40)
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------------- help & version


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help(command: str) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command:
        assert command in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fedtensor {__version__}"


def test_module_entry_point_help_has_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedtensor_cli", "--help"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "compress" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_nibabel_warning_is_one_warning_line(tmp_path: Path) -> None:
    """nibabel adds a stream handler of its own when it is imported, mid-command: its records still
    come out once, as a ``warning:`` line, never a second time raw (in a fresh interpreter)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    img.header["pixdim"][1:4] = 0
    nib.save(img, tmp_path / "pix0.nii")
    proc = subprocess.run([sys.executable, "-m", "fedtensor_cli", "evaluate", str(tmp_path / "pix0.nii"), str(tmp_path / "pix0.nii")],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    lines = [line for line in proc.stderr.splitlines() if "pixdim" in line]
    assert lines == ["warning: pixdim[1,2,3] should be non-zero; setting 0 dims to 1"], proc.stderr


def _modules_after(argv: list[str]) -> dict:
    """Which heavy packages a CLI command imported, run in a fresh interpreter."""
    code = ("import json, sys\nfrom fedtensor_cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nprint(json.dumps({'code': code, **{m: m in sys.modules for m in ('jax', 'flax', 'optax')}}))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, "FEDTENSOR_JIT_CACHE": "0"})
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_info_does_not_import_jax(ftz_path: Path) -> None:
    # reading a header is instant; JAX's import alone is most of a second
    assert _modules_after(["info", str(ftz_path), "--json"]) == {"code": 0, "jax": False, "flax": False, "optax": False}


def test_compress_without_model_does_not_import_the_nn_stack(vol_path: Path, tmp_path: Path) -> None:
    got = _modules_after(["compress", str(vol_path), str(tmp_path / "x.ftz"), "--psnr", "40"])
    assert got == {"code": 0, "jax": True, "flax": False, "optax": False}


# ------------------------------------------------------------------------------- main(): usage errors


def _main_error(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return exc.value.code, lines[0]


def test_main_parse_error_is_one_line(capsys) -> None:
    code, line = _main_error(capsys, ["compress", "a.npy", "b.ftz", "--psnr", "abc"])
    assert code == 2 and "--psnr" in line


def test_main_unknown_command_is_one_line(capsys) -> None:
    code, line = _main_error(capsys, ["frobnicate"])
    assert code == 2 and "frobnicate" in line


def test_main_missing_argument_is_one_line(capsys) -> None:
    code, _ = _main_error(capsys, ["compress"])
    assert code == 2


def test_main_runtime_error_exit_1(capsys, tmp_path: Path) -> None:
    code, line = _main_error(capsys, ["info", str(tmp_path / "missing.ftz")])
    assert code == 1 and "not found" in line


def test_main_success_exit_0(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedtensor {__version__}"


# ------------------------------------------------------------------------------- rate-mode options


def test_rate_target_default_is_psnr_45() -> None:
    assert rate_target(None, None, None, False) == ("psnr", 45.0)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"psnr": 50.0}, ("psnr", 50.0)),
        ({"max_error": 0.0}, ("max_error", 0.0)),
        ({"bpv": 1.5}, ("bpv", 1.5)),
        ({"lossless": True}, ("lossless", None)),
    ],
)
def test_rate_target_single_mode(kwargs: dict, expected: tuple) -> None:
    args = {"psnr": None, "max_error": None, "bpv": None, "lossless": False, **kwargs}
    assert rate_target(**args) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["--psnr", "40", "--lossless"],
        ["--psnr", "40", "--bpv", "1"],
        ["--max-error", "2", "--lossless"],
        ["--psnr", "0"],
        ["--psnr", "-3"],
        ["--psnr", "inf"],
        ["--psnr", "1000"],
        ["--max-error", "inf"],
        ["--model", "http://[::1"],
        ["--bpv", "0"],
        ["--bpv", "nan"],
        ["--max-error", "-1"],
        ["--block", "1"],
        ["--lossless", "--codec", "omlsvd-global"],  # the exact modes have their own coder
        ["--max-error", "2", "--block", "8"],
        ["--codec", "omlsvd-global", "--block", "8"],
    ],
)
def test_bad_rate_options_are_usage_errors(tmp_path: Path, vol_path: Path, args: list[str]) -> None:
    out = tmp_path / "o.ftz"
    result = run("compress", vol_path, out, *args)
    assert_one_error(result, code=2)
    assert not out.exists()


def test_conflicting_modes_message(tmp_path: Path, vol_path: Path) -> None:
    line = assert_one_error(run("compress", vol_path, tmp_path / "o.ftz", "--psnr", 40, "--lossless"), code=2)
    assert "--psnr" in line and "--lossless" in line


def test_rate_target_rejects_conflicts_directly() -> None:
    with pytest.raises(UsageFailure):
        rate_target(40.0, None, 1.0, False)


# ------------------------------------------------------------------------------------ error paths


def test_missing_input(tmp_path: Path) -> None:
    out = tmp_path / "o.ftz"
    assert_one_error(run("compress", tmp_path / "missing.nii.gz", out), code=1, contains="not found")
    assert not out.exists()


@pytest.mark.parametrize("command", ("decompress", "info", "evaluate"))
def test_missing_input_other_commands(tmp_path: Path, command: str) -> None:
    args = {
        "decompress": [tmp_path / "missing.ftz", tmp_path / "o.nii.gz"],
        "info": [tmp_path / "missing.ftz"],
        "evaluate": [tmp_path / "missing.nii.gz", tmp_path / "missing.ftz"],
    }[command]
    assert_one_error(run(command, *args), code=1, contains="not found")


def test_error_message_is_not_rich_markup(tmp_path: Path) -> None:
    line = assert_one_error(run("info", tmp_path / "[bold]x[/bold].ftz"), code=1)
    assert "[bold]x[/bold]" in line


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    bogus = tmp_path / "x.nii.gz"
    bogus.write_text("this is not a NIfTI file\n")
    assert_one_error(run("compress", bogus, tmp_path / "o.ftz"), code=1)
    assert not (tmp_path / "o.ftz").exists()


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((6, 7), np.int16), "2D"),
        (np.zeros((6, 7, 5, 3), np.int16), "4D"),
        (np.full((6, 7, 5), np.nan, np.float32), "NaN"),
    ],
    ids=["2d", "4d", "nan"],
)
def test_bad_npy_volumes(tmp_path: Path, array: np.ndarray, needle: str) -> None:
    src = tmp_path / "bad.npy"
    np.save(src, array)
    assert_one_error(run("compress", src, tmp_path / "o.ftz"), code=1, contains=needle)
    assert not (tmp_path / "o.ftz").exists()


def test_existing_output_is_untouched_without_force(tmp_path: Path, vol_path: Path) -> None:
    out = tmp_path / "o.ftz"
    out.write_bytes(b"precious")
    assert_one_error(run("compress", vol_path, out), code=1, contains="exists")
    assert out.read_bytes() == b"precious"


def test_existing_output_overwritten_with_force(tmp_path: Path, vol_path: Path) -> None:
    out = tmp_path / "o.ftz"
    out.write_bytes(b"precious")
    result = run("compress", vol_path, out, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"FTZ1"


def test_output_into_missing_directory(tmp_path: Path, vol_path: Path) -> None:
    out = tmp_path / "nope" / "o.ftz"
    assert_one_error(run("compress", vol_path, out), code=1, contains="does not exist")
    assert not out.parent.exists()


def test_output_under_a_file_or_an_unwritable_directory_fails_before_the_work(tmp_path: Path, ftz_path: Path,
                                                                              monkeypatch) -> None:
    (tmp_path / "a.npy").write_bytes(b"x")
    assert_one_error(run("decompress", ftz_path, tmp_path / "a.npy" / "x.nii.gz"), code=1,
                     contains="output directory is not a directory")
    import fedtensor_cli.paths as paths_mod

    monkeypatch.setattr(paths_mod.os, "access", lambda path, mode: False)  # (root may write anywhere)
    monkeypatch.setattr("fedtensor.codec.decompress", lambda data: pytest.fail("decoded before the check"))
    assert_one_error(run("decompress", ftz_path, tmp_path / "o.nii.gz"), code=1, contains="permission denied")


def test_decompress_into_missing_directory(tmp_path: Path, ftz_path: Path) -> None:
    out = tmp_path / "nope" / "o.nii.gz"
    assert_one_error(run("decompress", ftz_path, out), code=1, contains="does not exist")


def test_compress_output_needs_ftz_suffix(tmp_path: Path, vol_path: Path) -> None:
    assert_one_error(run("compress", vol_path, tmp_path / "o.nii.gz"), code=2, contains=".ftz")


def test_decompress_output_suffix(tmp_path: Path) -> None:
    src = tmp_path / "x.ftz"
    src.write_bytes(b"whatever")
    assert_one_error(run("decompress", src, tmp_path / "o.txt"), code=2, contains=".nii.gz")


def test_unknown_codec(tmp_path: Path, vol_path: Path) -> None:
    assert_one_error(run("compress", vol_path, tmp_path / "o.ftz", "--codec", "nope"), code=2, contains="nope")


@pytest.mark.parametrize("command", ("decompress", "info", "evaluate"))
def test_non_ftz_file(tmp_path: Path, vol_path: Path, command: str) -> None:
    junk = tmp_path / "junk.ftz"
    junk.write_bytes(b"PK\x03\x04 definitely not an ftz stream" * 10)
    args = {
        "decompress": [junk, tmp_path / "o.nii.gz"],
        "info": [junk],
        "evaluate": [vol_path, junk],
    }[command]
    assert_one_error(run(command, *args), code=1)
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("cut", (3, 10, 0.5, -1), ids=["magic", "header", "half", "hash"])
def test_truncated_ftz(tmp_path: Path, ftz_path: Path, cut: float) -> None:
    data = ftz_path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    bad = tmp_path / "truncated.ftz"
    bad.write_bytes(data[:n])
    out = tmp_path / "o.nii.gz"
    assert_one_error(run("decompress", bad, out), code=1)
    assert not out.exists()
    assert_one_error(run("info", bad), code=1)


@pytest.mark.parametrize("where", (0.3, 0.6, 0.9))
def test_bit_flipped_ftz(tmp_path: Path, ftz_path: Path, where: float) -> None:
    data = bytearray(ftz_path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    bad = tmp_path / "flipped.ftz"
    bad.write_bytes(bytes(data))
    out = tmp_path / "o.npy"
    assert_one_error(run("decompress", bad, out), code=1)
    assert not out.exists()


def test_evaluate_tells_an_exact_match_from_a_constant_original(tmp_path: Path) -> None:
    """PSNR is +inf for identical volumes and -inf for a constant original against another volume: the
    table says which, and JSON (no infinities: both null) carries ``exact``."""
    for name, value in (("a", 3), ("b", 3), ("c", 4)):
        np.save(tmp_path / f"{name}.npy", np.full((4, 5, 6), value, np.int16))
    same = run_json("evaluate", tmp_path / "a.npy", tmp_path / "b.npy")
    other = run_json("evaluate", tmp_path / "a.npy", tmp_path / "c.npy")
    assert same["psnr_db"] is None and same["exact"] is True
    assert other["psnr_db"] is None and other["exact"] is False and other["max_abs_error"] == 1
    table = run("evaluate", tmp_path / "a.npy", tmp_path / "c.npy").stdout
    assert "constant original" in table and "∞ (exact)" not in table


def test_evaluate_shape_mismatch(tmp_path: Path, vol_path: Path) -> None:
    other = tmp_path / "other.npy"
    np.save(other, smooth_volume((10, 10, 10)))
    assert_one_error(run("evaluate", vol_path, other), code=1, contains="shape")


# -------------------------------------------------------------------------------- directory rule


def test_batch_dir_rule(tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    vols.mkdir()
    np.save(vols / "a.npy", np.zeros((2, 2, 2)))
    (vols / "notes.txt").write_text("x")
    assert paths.is_batch_dir(vols)
    assert paths.batch_volume_inputs(vols) == [vols / "a.npy"]
    (vols / "IM0001").write_bytes(b"\0" * 128 + b"DICM")  # a loose slice is no item: said, not dropped silently
    with pytest.warns(UserWarning, match="1 DICOM file directly in .* is not part of the batch"):
        assert paths.batch_volume_inputs(vols) == [vols / "a.npy"]

    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i:04d}").write_bytes(b"\0" * 132 + b"DICM")
    assert not paths.is_batch_dir(series)

    studies = tmp_path / "studies"
    (studies / "s1").mkdir(parents=True)
    (studies / "s1" / "IM0001.dcm").write_bytes(b"x")
    (studies / "empty").mkdir()
    (studies / ".hidden").write_text("x")
    assert paths.is_batch_dir(studies)
    assert paths.batch_volume_inputs(studies) == [studies / "s1"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert not paths.is_batch_dir(empty)


def test_shared_dicom_series_is_not_a_batch(data_dir: Path) -> None:
    series = data_dir / "ct_series_dicom"
    if not series.is_dir():
        pytest.skip("ct_series_dicom not in the shared data")
    assert not paths.is_batch_dir(series)


def test_a_truncated_dicom_slice_is_one_error_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    """pydicom both warns and logs the end of file it met; the user sees only the error naming the file."""
    series = data_dir / "ct_series_dicom"
    if not series.is_dir():
        pytest.skip("ct_series_dicom not in the shared data")
    copy = tmp_path / "series"
    copy.mkdir()
    for f in sorted(series.iterdir()):
        (copy / f.name).write_bytes(f.read_bytes())
    victim = sorted(copy.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(copy), str(tmp_path / "o.ftz")])  # main: the warning routing users get
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: cannot read DICOM file") and victim.name in err[0], err


def test_stems_and_name_collisions(tmp_path: Path) -> None:
    assert paths.stem(Path("ct.nii.gz")) == "ct"
    assert paths.stem(Path("a.b.npy")) == "a.b"
    assert paths.stem(Path("x.ftz")) == "x"
    assert paths.stem(Path("series")) == "series"
    pairs = paths.batch_outputs([Path("a.nii"), Path("a.npy"), Path("b.npy")], tmp_path, ".ftz")
    assert [p[1] for p in pairs] == [None, None, tmp_path / "b.ftz"]  # neither a wins by its place in the list
    assert pairs[0][2] == pairs[1][2] == "a.nii, a.npy would all be written as a.ftz; rename or move all but one"


def test_empty_directories_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error(run("decompress", empty, tmp_path / "o"), code=1, contains="no .ftz")
    assert_one_error(run("compress", empty, tmp_path / "o.ftz"), code=1)  # read as a (bad) DICOM series


# ------------------------------------------------------------------------------------ happy paths


def test_compress_reports_ssim_only_when_asked(tmp_path: Path, vol_path: Path) -> None:
    """PSNR and max error come from the encoder's own measurement of the decoded stream; the SSIM needs a
    decode of its own, so only --ssim pays for it."""
    c = run_json("compress", vol_path, tmp_path / "a.ftz")
    assert c["ssim"] is None and c["decode_seconds"] is None
    e = run_json("evaluate", vol_path, tmp_path / "a.ftz")
    assert c["psnr_db"] == pytest.approx(e["psnr_db"], abs=1e-6)
    assert c["max_abs_error"] == pytest.approx(e["max_abs_error"])
    s = run_json("compress", vol_path, tmp_path / "b.ftz", "--ssim")
    assert s["ssim"] == pytest.approx(e["ssim"], abs=1e-6) and s["decode_seconds"] > 0


def test_round_trip_json(tmp_path: Path, vol_path: Path) -> None:
    ftz = tmp_path / "vol.ftz"
    c = run_json("compress", vol_path, ftz, "--ssim")  # default mode: --psnr 45
    assert c["command"] == "compress" and c["mode"] == "psnr" and c["target"] == 45.0
    assert c["compressed_bytes"] == ftz.stat().st_size > 0
    assert c["original_bytes"] == smooth_volume().nbytes
    assert c["bpv"] == pytest.approx(8 * c["compressed_bytes"] / smooth_volume().size)
    assert c["ratio"] == pytest.approx(c["original_bytes"] / c["compressed_bytes"])
    assert c["psnr_db"] >= 45.0
    assert 0.0 < c["ssim"] <= 1.0
    assert c["max_abs_error"] >= 0.0
    assert c["shape"] == [24, 20, 16] and c["dtype"] == "int16"

    i = run_json("info", ftz)
    assert i["file_bytes"] == ftz.stat().st_size
    assert list(i["shape"]) == [24, 20, 16] and np.dtype(i["dtype"]) == np.int16
    assert i["bits_per_voxel"] == pytest.approx(c["bpv"])

    out = tmp_path / "decoded.nii.gz"
    d = run_json("decompress", ftz, out)
    assert out.exists() and d["shape"] == [24, 20, 16] and d["dtype"] == "int16"

    e_file = run_json("evaluate", vol_path, out)
    e_ftz = run_json("evaluate", vol_path, ftz)
    for e in (e_file, e_ftz):
        assert e["psnr_db"] == pytest.approx(c["psnr_db"], abs=1e-6)
        assert e["max_abs_error"] == pytest.approx(c["max_abs_error"])
        assert e["ssim"] == pytest.approx(c["ssim"], abs=1e-6)
    assert e_ftz["bpv"] == pytest.approx(c["bpv"]) and "bpv" not in e_file


def test_tables_render(tmp_path: Path, vol_path: Path) -> None:
    ftz = tmp_path / "vol.ftz"
    result = run("compress", vol_path, ftz, "--psnr", 42)
    assert result.exit_code == 0, result.output
    for word in ("ratio", "bits per voxel", "PSNR", "SSIM", "max abs error", "time"):
        assert word in result.stdout
    for args in (("info", ftz), ("decompress", ftz, tmp_path / "d.npy"), ("evaluate", vol_path, ftz)):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip()


@pytest.mark.parametrize("target", (35.0, 50.0))
def test_psnr_target_reached(tmp_path: Path, vol_path: Path, target: float) -> None:
    ftz = tmp_path / "v.ftz"
    c = run_json("compress", vol_path, ftz, "--psnr", target)
    assert c["psnr_db"] >= target
    out = tmp_path / "v.npy"
    run_json("decompress", ftz, out)
    from fedtensor.metrics import psnr

    assert psnr(np.load(vol_path), np.load(out)) >= target


@pytest.mark.parametrize("dtype", (np.int16, np.uint8, np.int32))
def test_lossless_is_exact(tmp_path: Path, dtype) -> None:
    src = tmp_path / "v.npy"
    original = smooth_volume(dtype=dtype) if dtype != np.uint8 else (smooth_volume() % 256).astype(np.uint8)
    np.save(src, original)
    c = run_json("compress", src, tmp_path / "v.ftz", "--lossless")
    assert c["mode"] == "lossless" and c["max_abs_error"] == 0.0 and c["psnr_db"] is None  # inf → null
    out = tmp_path / "back.npy"
    run_json("decompress", tmp_path / "v.ftz", out)
    back = np.load(out)
    assert back.dtype == original.dtype
    np.testing.assert_array_equal(back, original)


@pytest.mark.parametrize("dtype, bound", [(np.int16, 3.0), (np.int16, 0.0), (np.float32, 0.5)])
def test_max_error_bound(tmp_path: Path, dtype, bound: float) -> None:
    src = tmp_path / "v.npy"
    original = smooth_volume(dtype=dtype)
    np.save(src, original)
    c = run_json("compress", src, tmp_path / "v.ftz", "--max-error", bound)
    assert c["max_abs_error"] <= bound
    out = tmp_path / "back.npy"
    run_json("decompress", tmp_path / "v.ftz", out)
    err = np.max(np.abs(np.load(out).astype(np.float64) - original.astype(np.float64)))
    assert err <= bound


def test_bpv_mode_runs(tmp_path: Path, vol_path: Path) -> None:
    c = run_json("compress", vol_path, tmp_path / "v.ftz", "--bpv", 4)
    assert c["mode"] == "bpv" and c["target"] == 4.0 and c["bpv"] > 0


def test_every_codec_round_trips(tmp_path: Path, vol_path: Path) -> None:
    from fedtensor.codec import CODECS

    for codec in CODECS:
        c = run_json("compress", vol_path, tmp_path / f"{codec}.ftz", "--codec", codec, "--psnr", 40)
        assert c["codec"] == codec and c["psnr_db"] >= 40


def test_directory_mode(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", smooth_volume(seed=1))
    np.save(src / "b.npy", smooth_volume((16, 16, 12), seed=2))
    (src / "README.txt").write_text("ignored: not a volume")

    out = tmp_path / "out"
    c = run_json("compress", src, out, "--psnr", 40)
    assert c["batch"] and c["count"] == 2 and c["failed"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.ftz", "b.ftz"]
    assert all(r["ok"] and r["psnr_db"] >= 40 for r in c["results"])

    back = tmp_path / "back"
    d = run_json("decompress", out, back)
    assert d["count"] == 2 and d["failed"] == 0
    assert sorted(p.name for p in back.iterdir()) == ["a.nii.gz", "b.nii.gz"]

    npy = tmp_path / "npy"
    run_json("decompress", out, npy, "--format", "npy")
    assert np.load(npy / "b.npy").shape == (16, 16, 12)

    # Re-running without --force fails per file and leaves the outputs alone.
    before = (out / "a.ftz").read_bytes()
    again = run("compress", src, out, "--psnr", 40, "--json")
    assert again.exit_code == 1
    assert json.loads(again.stdout)["failed"] == 2
    assert (out / "a.ftz").read_bytes() == before


def test_directory_mode_with_its_output_inside_the_input(tmp_path: Path) -> None:
    """``compress vols vols/out`` again: the earlier run's output directory is not taken for a DICOM
    series of the batch; decompressing into a folder inside the .ftz folder works the same."""
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", smooth_volume(seed=1))
    for _ in range(2):
        c = run_json("compress", src, src / "out", "--psnr", 40, "--force")
        assert c["count"] == 1 and c["failed"] == 0
    assert sorted(p.name for p in (src / "out").iterdir()) == ["a.ftz"]
    for _ in range(2):
        d = run_json("decompress", src / "out", src / "out" / "back", "--force")
        assert d["count"] == 1 and d["failed"] == 0


def test_an_earlier_runs_output_under_another_name_is_skipped_not_failed(tmp_path: Path) -> None:
    # compress in in/run1, then in in/run2: run1 (only .ftz files) failed as "no DICOM image files"
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", smooth_volume(seed=1))
    run_json("compress", src, src / "run1", "--psnr", 40)
    with pytest.warns(UserWarning, match="skipped run1: holding only .ftz files"):
        c = run_json("compress", src, src / "run2", "--psnr", 40)
    assert c["count"] == 1 and c["failed"] == 0


def test_a_read_only_file_system_is_named(tmp_path: Path, vol_path: Path, monkeypatch) -> None:
    import fedtensor_cli.paths as paths

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(paths.os, "access", lambda *a, **k: False)
    monkeypatch.setattr(paths.os, "statvfs", lambda p: ReadOnly)
    r = run("compress", vol_path, tmp_path / "o.ftz")
    assert r.exit_code == 1 and r.stderr.strip().endswith("read-only file system"), r.stderr
    r = run("compress", vol_path.parent, tmp_path / "outdir")  # a batch: refused once, before any item
    assert r.exit_code == 1 and r.stderr.strip().endswith("read-only file system"), r.stderr


def test_directory_input_refuses_a_file_name_as_output(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", smooth_volume(seed=1))
    run_json("compress", src, tmp_path / "out", "--psnr", 40)
    for args in (("compress", src, tmp_path / "a.ftz"), ("decompress", tmp_path / "out", tmp_path / "a.nii.gz")):
        result = run(*args)
        assert result.exit_code == 2 and "must be a directory" in result.stderr
        assert not args[2].exists()


def test_directory_mode_reports_failures_per_file(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "good.npy", smooth_volume())
    np.save(src / "flat.npy", np.zeros((5, 5), np.int16))  # 2D: fails
    out = tmp_path / "out"
    result = run("compress", src, out, "--json")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    report = json.loads(result.stdout)
    assert (report["count"], report["failed"]) == (2, 1)
    failed = [r for r in report["results"] if not r["ok"]]
    assert Path(failed[0]["input"]).name == "flat.npy"
    assert (out / "good.ftz").exists() and not (out / "flat.ftz").exists()
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "flat.npy" in errors[0]


def test_real_ct_head(tmp_path: Path) -> None:
    if not CT_HEAD.exists():
        pytest.skip(f"{CT_HEAD} missing")
    ftz = tmp_path / "ct.ftz"
    c = run_json("compress", CT_HEAD, ftz, "--psnr", 45, "--ssim")
    assert c["shape"] == [175, 248, 58] and c["dtype"] == "uint8"
    assert c["psnr_db"] >= 45.0 and c["ssim"] > 0.9
    assert c["bpv"] < 8.0  # compresses at all
    out = tmp_path / "ct.nii.gz"
    run_json("decompress", ftz, out)
    e = run_json("evaluate", CT_HEAD, out)
    assert e["psnr_db"] == pytest.approx(c["psnr_db"], abs=1e-6)


@pytest.mark.slow
def test_single_dicom_series_is_compressed_as_one(data_dir: Path, tmp_path: Path) -> None:
    series = data_dir / "ct_series_dicom"
    if not series.is_dir():
        pytest.skip("ct_series_dicom not in the shared data")
    c = run_json("compress", series, tmp_path / "series.ftz", "--psnr", 40)
    assert not c.get("batch") and len(c["shape"]) == 3 and c["psnr_db"] >= 40


def test_info_json_keys_of_the_file_never_mask_the_commands_own(tmp_path: Path, ftz_path: Path) -> None:
    from fedtensor.codec.container import pack, unpack

    header, sections = unpack(ftz_path.read_bytes())
    forged = tmp_path / "forged.ftz"
    forged.write_bytes(pack({**header, "input": "/etc/passwd", "command": "rm"}, sections))
    info = run_json("info", forged)
    assert info["input"] == str(forged) and info["command"] == "info"


def test_info_escapes_control_characters_and_markup_of_the_file(tmp_path: Path, ftz_path: Path) -> None:
    """A header is untrusted: its escape sequences never reach the terminal raw, nor its text as markup."""
    from fedtensor.codec.container import pack, unpack

    header, sections = unpack(ftz_path.read_bytes())
    forged = tmp_path / "forged.ftz"
    forged.write_bytes(pack({**header, "modality": "CT\x1b]0;PWNED\x07\x1b[2J", "[red]key[/red]": "\x9b31m"},
                            sections))
    r = run("info", forged)
    assert r.exit_code == 0, r.output
    assert not any(c in r.stdout for c in "\x1b\x07\x9b")
    assert "CT\\x1b]0;PWNED\\x07\\x1b[2J" in r.stdout and "[red]key[/red]" in r.stdout and "\\x9b31m" in r.stdout


def test_errors_about_an_ftz_file_name_it(tmp_path: Path, ftz_path: Path, vol_path: Path) -> None:
    bad = tmp_path / "bad.ftz"
    bad.write_bytes(b"not an ftz file at all")
    cut = tmp_path / "cut.ftz"
    cut.write_bytes(ftz_path.read_bytes()[:-9])
    for args in (("info", bad), ("decompress", cut, tmp_path / "o.nii.gz"), ("evaluate", vol_path, bad)):
        assert_one_error(run(*args), code=1, contains=f"{args[-1] if args[0] == 'evaluate' else args[1]}: ")
    (tmp_path / "dir.ftz").mkdir()
    assert_one_error(run("info", tmp_path / "dir.ftz"), code=1, contains="is a directory, not an .ftz file")
    assert run_json("info", ftz_path)["dtype"] in ("uint8", "int16", "float32")  # a dtype name, not "|u1"


def test_third_party_warnings_are_single_lines(capsys, monkeypatch, tmp_path: Path) -> None:
    """A warning or a library's log record while a command runs is one 'warning:' line (once), the error
    stays one line, and nothing of the routing outlives the command."""
    import logging
    import warnings

    from fedtensor.errors import FedtensorError

    def noisy(*args, **kwargs):
        warnings.warn("first line of a library warning\nand a second line", UserWarning)
        logging.getLogger("pydicom").warning("first line of a library warning\nand a second line")  # same: once
        logging.getLogger("nibabel.nifti1").warning("pixdim[1,2,3] should be non-zero")
        np.float64(1.0) / np.float64(0.0)  # numpy's RuntimeWarning: dropped
        raise FedtensorError("the failure itself")

    monkeypatch.setattr(paths, "require_input", noisy)
    before = (warnings.showwarning, list(warnings.filters), logging.getLogger("nibabel").handlers[:])
    with pytest.raises(SystemExit):
        main(["info", str(tmp_path / "x.ftz")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: first line of a library warning and a second line",
                   "warning: pixdim[1,2,3] should be non-zero", "error: the failure itself"]
    assert (warnings.showwarning, list(warnings.filters), logging.getLogger("nibabel").handlers) == before


@pytest.mark.parametrize("text", ["nan,16", "8,inf"])
def test_non_finite_channel_lists_are_usage_errors(text: str) -> None:
    from fedtensor_cli.train_cmd import _ints

    with pytest.raises(UsageFailure, match="must be finite numbers"):
        _ints(text, "--channels")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_serve_refuses_a_non_finite_upload_limit(tmp_path: Path, value: str) -> None:
    result = run("serve", "--data", tmp_path / "d", "--max-upload-mb", value)
    assert_one_error(result, code=2, contains="--max-upload-mb must be a finite number")


def test_training_data_directories_skip_run_directories(tmp_path: Path) -> None:
    """With --out inside DATA, a resumed run must not read its own model (or cache) as a volume."""
    from fedtensor_cli.train_cmd import expand_data

    data = tmp_path / "vols"
    (data / "model" / "checkpoint").mkdir(parents=True)
    (data / "model" / "model.json").write_text("{}")
    (data / "mycache").mkdir()
    (data / "mycache" / "x.npz").write_bytes(b"")
    for name in ("a.npy", "b.npy"):
        np.save(data / name, smooth_volume())
    got = expand_data([data], skip=(data / "model", data / "mycache"))
    assert sorted(p.name for p in got) == ["a.npy", "b.npy"]


def test_training_data_directories_skip_other_runs_leftovers(tmp_path: Path) -> None:
    """Another run's --cache inside DATA (only .npz pairs), or the checkpoint of a run whose --out was
    DATA, are no DICOM series: a later run with other directories failed on them ("no DICOM image
    files in directory …/cache") after encoding every real volume."""
    from fedtensor_cli.train_cmd import expand_data

    data = tmp_path / "vols"
    (data / "oldcache").mkdir(parents=True)
    (data / "oldcache" / "a-0123-block-tucker-b8-40.npz").write_bytes(b"")
    (data / "checkpoint").mkdir()
    (data / "checkpoint" / "state.json").write_text("{}")
    from fedtensor.serve.store import ModelStore

    ModelStore(data / "store")  # e.g. federate --publish into DATA: the resume failed on it
    (data / "store" / ".lock").touch()
    np.save(data / "a.npy", smooth_volume())
    assert [p.name for p in expand_data([data], skip=(tmp_path / "elsewhere", None))] == ["a.npy"]


def test_evaluate_warns_when_original_is_not_the_streams_volume(tmp_path: Path, ftz_path: Path) -> None:
    other = tmp_path / "other.npy"
    np.save(other, np.ascontiguousarray(smooth_volume()[::-1]))  # same shape and dtype, other voxels
    result = run("evaluate", other, ftz_path, "--json")
    assert result.exit_code == 0, result.output
    assert "is it the volume it was made from?" in result.stderr
    assert json.loads(result.stdout)["warning"]


def test_out_equal_to_data_skips_its_own_checkpoint_and_cache(tmp_path: Path) -> None:
    from fedtensor_cli.train_cmd import expand_data

    data = tmp_path / "vols"
    for sub in ("checkpoint", "cache", "series"):
        (data / sub).mkdir(parents=True)
        (data / sub / "x.dcm").write_bytes(b"")
    np.save(data / "a.npy", smooth_volume())
    got = expand_data([data], skip=(data, None))
    assert sorted(p.name for p in got) == ["a.npy", "series"]  # a real series directory stays
    # --out models/ct inside DATA: `models` holds the run (its checkpoint/ is not a series either), so
    # the resumed run must not take it for a DICOM series without images
    (data / "models" / "ct" / "checkpoint").mkdir(parents=True)
    got = expand_data([data], skip=(data / "models" / "ct", None))
    assert sorted(p.name for p in got) == ["a.npy", "cache", "checkpoint", "series"]


def test_bench_with_an_empty_codec_list_is_a_usage_error(vol_path: Path) -> None:
    from fedtensor.bench.cli import BenchUsageError, normalize_args

    with pytest.raises(BenchUsageError, match="--codecs names no codec"):
        normalize_args([str(vol_path)], None, [""])
    with pytest.raises(BenchUsageError, match="--targets names no target"):
        normalize_args([str(vol_path)], [""], None)


def test_bench_refuses_a_volume_given_twice(vol_path: Path) -> None:
    """It would be measured twice and weigh twice in the mean BD-rates."""
    from fedtensor.bench.cli import BenchUsageError, normalize_args

    with pytest.raises(BenchUsageError, match="the same volume is given twice"):
        normalize_args([str(vol_path), str(vol_path.parent / ".." / vol_path.parent.name / vol_path.name)], None, None)


def test_train_refuses_a_cache_that_is_a_file(tmp_path: Path, vol_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = run("train", vol_path, "--out", tmp_path / "m", "--cache", tmp_path / "afile")
    assert_one_error(result, code=2, contains="--cache must be a directory")


def test_train_refuses_a_volume_given_twice_before_any_work(tmp_path: Path, vol_path: Path) -> None:
    result = run("train", vol_path, "--out", tmp_path / "m", "--val", vol_path)
    assert_one_error(result, code=2, contains="the same volume is given twice")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["train", "federate"])
def test_a_failed_run_leaves_no_empty_run_directory(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "text.nii.gz"
    bad.write_text("not a volume")
    assert_one_error(run(command, bad, "--out", tmp_path / "m"), code=1, contains="text.nii.gz")
    assert not (tmp_path / "m").exists()
    (tmp_path / "kept").mkdir()  # a directory the user made stays
    run(command, bad, "--out", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_compress_takes_a_block_shape_as_info_shows_it(tmp_path: Path, vol_path: Path) -> None:
    c = run_json("compress", vol_path, tmp_path / "a.ftz", "--block", "4x4x8", "--psnr", 40)
    assert c["params"]["block"] == [4, 4, 8] and c["psnr_db"] >= 40
    assert_one_error(run("compress", vol_path, tmp_path / "b.ftz", "--block", "4x4"), code=2, contains="--block")


def test_evaluate_warns_when_the_volumes_lie_differently_in_space(tmp_path: Path) -> None:
    import nibabel as nib

    data = smooth_volume(seed=3)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([5.0, 5.0, 5.0, 1.0])), tmp_path / "b.nii.gz")
    assert run_json("evaluate", tmp_path / "a.nii.gz", tmp_path / "a.nii.gz")["warning"] is None
    e = run_json("evaluate", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    assert e["ok"] and "affines differ" in e["warning"]


@pytest.mark.parametrize("typo, suggestion", [("infoo", "'info'"), ("compres", "'compress', 'decompress'")])
def test_a_mistyped_command_gets_one_suggestion(typo: str, suggestion: str) -> None:
    result = subprocess.run([sys.executable, "-c", "from fedtensor_cli.app import main; main()", typo],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("Did you mean") == 1 and suggestion in result.stderr


def test_evaluate_with_the_arguments_swapped_says_so(tmp_path: Path, ftz_path: Path, vol_path: Path) -> None:
    assert_one_error(run("evaluate", ftz_path, vol_path), code=2, contains="the order is ORIGINAL DECODED")


def test_compress_table_shows_the_block_as_block_takes_it_and_help_keeps_version_syntax() -> None:
    from fedtensor_cli.render import params_text

    text = params_text({"block": [16, 16, 8], "step": 0.04173, "slab": 16})
    assert text.startswith("block=16x16x8, ") and "step=0.04173" in text
    assert params_text({"axes": [0, 1], "offset": 0}) == "offset=0"
    assert "host:port[#version]" in " ".join(run("decompress", "--help").output.split())


def test_sigterm_stops_a_command_as_ctrl_c_does() -> None:
    """kill / systemd / a scheduler's time limit: KeyboardInterrupt (clean-up, "interrupted", exit 130),
    not a silent death leaving a fresh run directory behind; the previous handlers come back after."""
    import os
    import signal

    from fedtensor_cli.app import _interrupts

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in before:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts() as interrupted:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the signal arrives at once: never reached
        assert interrupted.is_set()
        assert {s: signal.getsignal(s) for s in before} == before


def test_an_interrupt_python_swallows_still_stops_the_output(tmp_path: Path, capsys) -> None:
    """Ctrl-C inside a garbage-collection callback is swallowed by Python ("Exception ignored in …"): the
    next output is then not committed (no file, no temp file), and no traceback is printed."""
    import signal

    from fedtensor.io import atomic, atomic_write_bytes
    from fedtensor_cli.app import _interrupts

    class Finalised:
        def __del__(self):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # as a Ctrl-C landing here

    hook = sys.unraisablehook
    with _interrupts() as interrupted:
        obj = Finalised()
        del obj  # the KeyboardInterrupt raised in __del__ goes nowhere
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert list(tmp_path.iterdir()) == [] and atomic.BEFORE_COMMIT == [] and sys.unraisablehook is hook
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("debug", ["", "1"])
def test_a_bug_exits_3_with_one_line_and_its_traceback_only_when_debugging(monkeypatch, debug, capsys) -> None:
    """An unexpected exception is ``error: internal error: …`` and exit 3; ``FEDTENSOR_DEBUG=1`` adds its
    traceback but keeps the code (it re-raised, and Python exited 1)."""
    from fedtensor_cli.errors import cli_errors

    monkeypatch.setenv("FEDTENSOR_DEBUG", debug)

    @cli_errors
    def buggy():
        return {}["missing"]

    import typer

    with pytest.raises(typer.Exit) as stopped:
        buggy()
    assert stopped.value.exit_code == 3
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith("error: internal error: KeyError")
    assert ("Traceback (most recent call last)" in err) == bool(debug)


def test_serve_without_flask_says_which_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_flask(name, *args, **kwargs):
        if name.split(".")[0] in ("flask", "werkzeug"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flask)
    monkeypatch.delitem(sys.modules, "fedtensor.serve.app", raising=False)
    result = runner.invoke(app, ["serve", "--data", str(tmp_path / "data")])
    assert_one_error(result, code=1, contains="pip install 'fedtensor[web]'")


def test_info_refuses_a_device_and_reads_only_the_start_of_a_foreign_file(tmp_path):
    # /dev/zero was read to the end (MemoryError: "internal error", exit 3); a 300 MB NIfTI whole to say "bad magic"
    proc = subprocess.run(["bash", "-c", f"ulimit -v 4000000; exec {sys.executable} -m fedtensor_cli info /dev/zero"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: /dev/zero is not a regular file", proc.stderr
    big = tmp_path / "big.ftz"
    with open(big, "wb") as f:
        f.write(b"NOPE")
        f.truncate(1 << 40)  # a sparse terabyte: reading it whole is impossible
    r = run("info", big)
    assert r.exit_code == 1 and "bad magic number" in r.stderr


def test_out_of_memory_is_a_failure_with_a_message_not_an_internal_error():
    from fedtensor_cli.errors import describe, exit_code_for

    assert exit_code_for(MemoryError()) == 1
    assert describe(MemoryError()) == "not enough memory for this input on this machine"
