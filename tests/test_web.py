"""The web interface through Flask's test client: every route, the failure paths, the safety rules.

The app is the real one (:func:`fedtensor.serve.app.create_app`) on real volumes: a crop of the
bundled CT head (fast to compress) and, for the DICOM upload, the shared 20-slice CT series zipped.
Jobs run on the app's real worker thread; tests wait for them.
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedtensor.serve.web import DEFAULT_MAX_VOXELS

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "ct_head_uint8.nii.gz"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def crop_path(tmp_path_factory) -> Path:
    """A 48×48×24 crop of the bundled CT head sample (uint8, its geometry)."""
    from fedtensor.io import Volume, read_volume, write_volume

    v = read_volume(SAMPLE)
    path = tmp_path_factory.mktemp("vol") / "head_crop.nii.gz"
    write_volume(Volume(v.data[64:112, 100:148, 17:41].copy(), v.spacing, v.affine), path)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory, crop_path):
    from fedtensor.serve.app import create_app

    root = tmp_path_factory.mktemp("web")
    app = create_app(root / "data", config={"FEDTENSOR_WEB": True, "FEDTENSOR_WEB_TMP": str(root / "tmp"),
                                            "FEDTENSOR_SAMPLES": {"head_crop.nii.gz": crop_path,
                                                                  "ct_head_uint8.nii.gz": SAMPLE},
                                            "MAX_CONTENT_LENGTH": 16 << 20})
    yield app
    app.extensions["fedtensor_web"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def csrf(client) -> str:
    r = client.get("/")
    assert r.status_code == 200
    return re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)


def manager(app):
    return app.extensions["fedtensor_web"]


def submit(client, *, timeout: float = 240, **form):
    """POST /compress with a valid token; wait for the job; return ``(response, job)``."""
    data = {"csrf_token": csrf(client), **form}
    r = client.post("/compress", data=data, content_type="multipart/form-data")
    if r.status_code != 303:
        return r, None
    jid = r.headers["Location"].rsplit("/", 1)[1]
    job = manager(client.application)._jobs[jid]
    assert job.finished.wait(timeout), "job did not finish"
    return r, job


def error_text(r) -> str:
    m = re.search(r'id="error-message"[^>]*>(.*?)</p>', r.text, re.S)
    assert m, r.text[:2000]
    import html

    return html.unescape(m.group(1)).strip()


def upload(path: Path, name: str | None = None):
    return (io.BytesIO(path.read_bytes()), name or path.name)


# ------------------------------------------------------------------------------------------ pages


def test_index_page_has_form_token_samples_and_local_assets(client):
    r = client.get("/")
    assert r.status_code == 200
    assert 'name="csrf_token"' in r.text and 'enctype="multipart/form-data"' in r.text
    assert '<option value="head_crop.nii.gz"' in r.text and '<option value="ct_head_uint8.nii.gz"' in r.text
    for mode in ("psnr", "max_error", "bpv", "lossless"):
        assert f'name="mode" value="{mode}"' in r.text
    # nothing from a CDN: every script and stylesheet is served by this app
    for src in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        assert src.startswith("/"), src
    for asset in ("/web-static/app.js", "/web-static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and len(a.data) > 500
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_wrong_method_and_unknown_pages_are_plain_errors(client):
    for method, path, status in (("get", "/compress", 405), ("get", "/nope", 404), ("post", "/federation", 405),
                                 ("get", "/web-static/../app.py", 404), ("get", "/web-static/missing.js", 404)):
        r = getattr(client, method)(path)
        assert r.status_code == status, path
        assert "Traceback" not in r.text


def test_session_cookie_is_httponly(client):
    r = client.get("/")
    cookie = r.headers.get("Set-Cookie", "")
    assert "session=" in cookie and "HttpOnly" in cookie


# ------------------------------------------------------------------------------------------ CSRF


@pytest.mark.parametrize("token", [None, "", "x" * 43])
def test_compress_without_a_valid_csrf_token_is_refused(client, token):
    csrf(client)  # the session has a token; the form does not carry it
    data = {"sample": "head_crop.nii.gz", "mode": "lossless"}
    if token is not None:
        data["csrf_token"] = token
    r = client.post("/compress", data=data)
    assert r.status_code == 400
    assert "the form has expired or did not come from this site" in error_text(r)
    assert "Traceback" not in r.text


def test_token_of_another_session_is_refused(app):
    a, b = app.test_client(), app.test_client()
    token_a = csrf(a)
    csrf(b)
    r = b.post("/compress", data={"csrf_token": token_a, "sample": "head_crop.nii.gz", "mode": "lossless"})
    assert r.status_code == 400


# ------------------------------------------------------------------------------------------ bad input


def test_not_a_volume_upload(client, app):
    before = _entries(app)
    r, _ = submit(client, volume=(io.BytesIO(b"hello, I am a text file\n" * 20), "notes.txt"), mode="lossless")
    assert r.status_code == 400
    assert error_text(r) == "not a NIfTI volume (.nii, .nii.gz) or a .zip of one DICOM series"
    assert _entries(app) == before


def _entries(app) -> list:
    """Every file and job directory (even empty) under the web app's temp area: a session's own
    directory, made by its first request, lives as long as the session."""
    root = manager(app).root
    return sorted(p for p in root.rglob("*") if p.is_file() or len(p.relative_to(root).parts) > 1)


def test_corrupt_gzip_upload(client, app):
    before = _entries(app)
    r, _ = submit(client, volume=(io.BytesIO(b"\x1f\x8b\x08\x00garbage" * 30), "scan.nii.gz"), mode="lossless")
    assert r.status_code == 400
    msg = error_text(r)
    assert msg.startswith("cannot read NIfTI file scan.nii.gz") and "/" not in msg
    assert _entries(app) == before  # the job's directory and its upload are gone


def test_truncated_nifti_upload(client, app, crop_path):
    before = _entries(app)
    data = crop_path.read_bytes()
    r, _ = submit(client, volume=(io.BytesIO(data[: len(data) // 2]), "cut.nii.gz"), mode="lossless")
    assert r.status_code == 400 and "cut.nii.gz" in error_text(r)
    assert _entries(app) == before


def test_2d_nifti_upload(client, app, tmp_path):
    import nibabel as nib

    before = _entries(app)
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64), np.eye(4)), p)
    r, _ = submit(client, volume=upload(p), mode="lossless")
    assert r.status_code == 400 and "2D" in error_text(r)
    assert _entries(app) == before


def test_hostile_file_name_is_never_a_path(client, app, crop_path):
    r, job = submit(client, volume=upload(crop_path, "../../../etc/passwd.nii.gz"), mode="lossless")
    assert r.status_code == 303
    assert job.name == "passwd.nii.gz"
    assert job.dir.parent.parent == manager(app).root
    assert sorted(p.name for p in job.dir.iterdir()) == ["decoded.nii.gz", "decoded.npy", "input.nii.gz",
                                                          "original.npy", "result.ftz"]


def test_upload_too_large(app, crop_path):
    c = app.test_client()
    token = csrf(c)
    big = io.BytesIO(b"\x1f\x8b" + bytes(17 << 20))
    r = c.post("/compress", data={"csrf_token": token, "volume": (big, "big.nii.gz"), "mode": "lossless"},
               content_type="multipart/form-data")
    assert r.status_code == 413
    assert error_text(r) == "the upload is too large; the limit is 16 MiB"


@pytest.mark.parametrize("form, message", [
    ({"mode": "psnr", "value": "abc"}, "target PSNR must be a number, got 'abc'"),
    ({"mode": "psnr", "value": "nan"}, "target PSNR must be finite"),
    ({"mode": "psnr", "value": "900"}, "target PSNR must be between 1 and 200, got 900"),
    ({"mode": "bpv", "value": "-1"}, "bits per voxel must be between 0.001 and 64, got -1"),
    ({"mode": "jpeg"}, "unknown mode 'jpeg'; choose one of psnr, max_error, bpv, lossless"),
    ({"mode": "lossless", "model": "seven"}, "unknown model choice 'seven'"),
    ({"mode": "lossless", "model": "7"}, "model version 7 is not in the store"),
])
def test_bad_settings(client, form, message):
    r, _ = submit(client, sample="head_crop.nii.gz", **form)
    assert r.status_code == 400 and error_text(r) == message


def test_unknown_sample_and_no_input(client):
    r, _ = submit(client, sample="../../secret.nii.gz", mode="lossless")
    assert r.status_code == 400 and error_text(r) == "unknown sample 'secret.nii.gz'"
    r, _ = submit(client, mode="lossless")
    assert r.status_code == 400 and error_text(r) == "choose a file to upload or a sample volume"


def test_failure_inside_the_job_is_shown_not_raised(client, tmp_path, crop_path):
    """Lossless on a non-integer float volume fails in the worker: the job page says why."""
    from fedtensor.io import Volume, read_volume, write_volume

    v = read_volume(crop_path)
    p = tmp_path / "float.nii.gz"
    write_volume(Volume(v.data.astype(np.float32) + 0.25, v.spacing, v.affine), p)
    r, job = submit(client, volume=upload(p), mode="lossless")
    assert job.state == "failed"
    page = client.get(r.headers["Location"])
    assert page.status_code == 200
    assert error_text(page) == (
        "exact coding (lossless, or a max error of 0) needs integer-valued voxels; give this float volume a "
        "positive max error")  # (in words the page and the CLI share: no command-line flags)
    assert client.get(r.headers["Location"] + "/status").json["state"] == "failed"
    assert client.get(r.headers["Location"] + "/download/ftz").status_code == 404
    assert client.get(r.headers["Location"] + "/compare").status_code == 409


# ------------------------------------------------------------------------------------------ DICOM zips


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zipped_dicom_series_reads_like_the_directory(tmp_path, volume_paths):
    from fedtensor.io import read_volume
    from fedtensor.serve.uploads import read_upload, save_upload

    series = volume_paths["ct_series_dicom"]
    # hostile member names: they only ever become generated names inside the job directory
    files = {f"../../evil/{p.name}" if i % 2 else f"/abs/{p.name}": p.read_bytes()
             for i, p in enumerate(sorted(series.iterdir()))}
    files["__MACOSX/._junk"] = b"resource fork"
    job = tmp_path / "job"
    job.mkdir()
    saved = save_upload(io.BytesIO(_zip(files)), job)
    assert saved.name == "input.zip"
    vol = read_upload(saved, "series.zip")
    ref = read_volume(series)
    assert np.array_equal(vol.data, ref.data) and np.allclose(vol.affine, ref.affine)
    assert sorted(p.name for p in (job / "dicom").iterdir()) == [f"{i:05d}.dcm" for i in range(len(files) - 1)]
    assert not (tmp_path / "evil").exists() and [p.name for p in tmp_path.iterdir()] == ["job"]


def test_zip_failure_paths(tmp_path):
    from fedtensor.serve.uploads import UploadError, extract_series, read_upload, save_upload

    def attempt(data: bytes, **kw):
        d = tmp_path / f"j{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        path = save_upload(io.BytesIO(data), d)
        if kw:
            return extract_series(path, d / "dicom", **kw)
        return read_upload(path, "x.zip")

    with pytest.raises(UploadError, match="the zip file holds no files"):
        attempt(_zip({"__MACOSX/._a": b"x"}))
    with pytest.raises(UploadError, match="no DICOM image files"):
        attempt(_zip({"readme.txt": b"not dicom"}))
    with pytest.raises(UploadError, match="expands to more than 1 MiB"):  # counted while inflating
        attempt(_zip({"a": bytes(3 << 20)}), max_bytes=1 << 20)
    with pytest.raises(UploadError, match="holds 5 files; at most 4"):
        attempt(_zip({f"f{i}": b"x" for i in range(5)}), max_members=4)
    many = _zip({f"d{i}/": b"" for i in range(17)})
    forged = bytearray(_zip({f"d{i:03d}/": b"" for i in range(120)}))  # its count, which ZipFile never checks, says 1
    end = forged.rfind(b"PK\x05\x06")
    forged[end + 8:end + 12] = (1).to_bytes(2, "little") * 2
    with pytest.MonkeyPatch.context() as mp:  # refused from the end record, before an index is built
        mp.setattr("zipfile.ZipFile.__init__", lambda *a, **k: pytest.fail("the whole index was read"))
        with pytest.raises(UploadError, match="holds 17 entries in a 0 KiB index; at most 4 files"):
            attempt(many, max_members=4)
        with pytest.raises(UploadError, match="holds 1 entries in a 5 KiB index; at most 4 files"):
            attempt(bytes(forged), max_members=4)
    with pytest.raises(UploadError, match="not a readable zip file"):
        attempt(b"PK\x03\x04" + b"\x00" * 100)


def test_zipped_series_over_the_voxel_limit(app, volume_paths):
    """The series is read from the zip (its voxel count is reported) and refused by the size limit."""
    series = volume_paths["ct_series_dicom"]
    c = app.test_client()
    app.config["FEDTENSOR_WEB_MAX_VOXELS"] = 1 << 20
    try:
        data = _zip({p.name: p.read_bytes() for p in sorted(series.iterdir())})
        r, _ = submit(c, volume=(io.BytesIO(data), "series.zip"), mode="lossless")
    finally:
        del app.config["FEDTENSOR_WEB_MAX_VOXELS"]
    assert r.status_code == 400
    assert error_text(r) == "DICOM series in series.zip has 5,242,880 voxels; at most 1,048,576 are accepted"


def _deflated_slice(k: int, n: int, series_uid: str) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = DeflatedExplicitVRLittleEndian, CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.Rows, ds.Columns = series_uid, "CT", n, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImageOrientationPatient, ds.PixelSpacing, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [1, 1], [0, 0, k]
    ds.PixelData = np.zeros((n, n), np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_deflated_dicom_is_refused_before_it_is_inflated(tmp_path):
    """pydicom inflates a deflated file whole on reading: 2 KB of zip would become 8 MB per slice here
    (and gigabytes at the largest Rows x Columns), so the upload is refused from its file meta alone."""
    from pydicom.uid import generate_uid

    from fedtensor.serve.uploads import UploadError, read_upload, save_upload

    uid = generate_uid()
    data = _zip({f"{k}.dcm": _deflated_slice(k, 2048, uid) for k in range(2)})
    assert len(data) < 64 << 10
    saved = save_upload(io.BytesIO(data), tmp_path)
    with pytest.raises(UploadError, match="^bomb.zip: deflate-compressed DICOM files are not accepted"):
        read_upload(saved, "bomb.zip", max_voxels=1 << 20)


def test_dicom_series_voxel_cap_is_checked_on_the_headers(volume_paths, monkeypatch):
    """The library reader refuses an over-large series before decoding a single slice's pixels."""
    import pydicom

    from fedtensor.errors import VolumeError
    from fedtensor.io import read_dicom_series

    def no_decoding(self):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(VolumeError, match="has 5,242,880 voxels; at most 5,242,879 are accepted"):
        read_dicom_series(volume_paths["ct_series_dicom"], max_voxels=5_242_879)


# ------------------------------------------------------------------------------------------ results


@pytest.fixture(scope="module")
def done_job(app, crop_path):
    """One max-error job on the crop, shared by the result-page tests: ``(client, job, url)``."""
    c = app.test_client()
    r, job = submit(c, volume=upload(crop_path), mode="max_error", value="3")
    assert r.status_code == 303 and job.state == "done", job.error
    assert job.finished.wait(120) and job.compare_state == "done"
    return c, job, r.headers["Location"]


def test_result_page_shows_the_figures(done_job, crop_path):
    from fedtensor.codec import decompress
    from fedtensor.io import read_volume
    from fedtensor.metrics import max_abs_error, psnr, ssim3d

    c, job, url = done_job
    page = c.get(url)
    assert page.status_code == 200

    def shown(name):
        return float(re.search(rf'id="m-{name}" data-value="([^"]+)"', page.text).group(1))

    orig = read_volume(crop_path).data
    dec = decompress((job.dir / "result.ftz").read_bytes()).data
    assert shown("max-error") == max_abs_error(orig, dec) <= 3
    assert shown("psnr") == pytest.approx(psnr(orig, dec), abs=1e-9)
    assert shown("ssim") == pytest.approx(float(ssim3d(orig, dec)), abs=1e-6)
    assert shown("ftz-bytes") == (job.dir / "result.ftz").stat().st_size
    assert shown("ratio") == pytest.approx(orig.nbytes / shown("ftz-bytes"))
    assert shown("bpv") == pytest.approx(8 * shown("ftz-bytes") / orig.size)
    assert page.text.count('class="slice"') == 9 and page.text.count('class="slider"') == 3
    assert 'max="47"' in page.text and 'max="23"' in page.text  # slice counts of the 48×48×24 crop


def test_status_json(done_job, app):
    c, job, url = done_job
    s = c.get(url + "/status")
    assert s.status_code == 200 and s.json["state"] == "done" and s.json["compare_state"] == "done"
    assert app.test_client().get(url + "/status").status_code == 404  # another session
    assert app.test_client().get(url + "/status").json == {
        "error": "no such job in this session (jobs expire after an hour of inactivity and do not "
                 "survive a restart of the server)"}


def test_compare_fragment_has_the_three_rivals_at_the_same_psnr(done_job):
    c, job, url = done_job
    r = c.get(url + "/compare")
    assert r.status_code == 200 and "<svg" in r.text
    rows = {row["codec"]: row for row in job.compare_rows}
    assert set(rows) == {"jpeg2000", "dwt", "pca"}
    for name, row in rows.items():
        assert row["bytes"] > 0 and row["psnr"] >= job.result["psnr"], row
        assert f'data-codec="{name}"' in r.text and f'data-bytes="{row["bytes"]}"' in r.text


def test_slices(done_job):
    import imagecodecs

    c, job, url = done_job
    for kind in ("original", "decoded", "diff"):
        for axis, shape in ((0, (24, 48)), (1, (24, 48)), (2, (48, 48))):
            r = c.get(f"{url}/slice/{kind}/{axis}/7.png?c=100&w=200&d=3")
            assert r.status_code == 200 and r.mimetype == "image/png"
            img = imagecodecs.png_decode(r.data)
            assert img.shape[:2] == shape and img.shape[2:] == ((3,) if kind == "diff" else ())
    orig = np.load(job.dir / "original.npy")
    img = imagecodecs.png_decode(c.get(f"{url}/slice/original/2/7.png?c=127.5&w=255").data)
    # full-range window of a uint8 volume: the image is the axial plane itself (flipped for display)
    assert np.array_equal(img, np.clip((orig[:, :, 7].T[::-1] - 0.0) / 255 * 255, 0, 255).astype(np.uint8))
    # an index past the end is clipped, not an error; bad parameters are
    assert c.get(f"{url}/slice/original/2/999.png").status_code == 200
    assert c.get(f"{url}/slice/original/3/0.png").status_code == 404
    assert c.get(f"{url}/slice/secret/0/0.png").status_code == 404
    r = c.get(f"{url}/slice/original/0/0.png?c=abc")
    assert r.status_code == 400 and "must be numbers" in error_text(r)


def test_slices_show_the_anatomy_the_same_way_whatever_the_voxel_order(client, crop_path, tmp_path):
    """The viewer's planes follow the affine: the same image stored in LPS voxel order (as a DICOM
    series is read) shows the axial plane exactly as the RAS-stored one, not turned 180°."""
    import imagecodecs
    import nibabel as nib

    ras = nib.as_closest_canonical(nib.load(crop_path))
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(ras.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]])), lps_path)
    ras_path = tmp_path / "ras.nii.gz"
    nib.save(ras, ras_path)
    assert nib.aff2axcodes(nib.load(lps_path).affine) == ("L", "P", "S")
    images = []
    for path in (ras_path, lps_path):
        r, job = submit(client, volume=upload(path), mode="lossless")
        assert job.result["view_shape"] == [48, 48, 24]
        images.append([imagecodecs.png_decode(client.get(f"{r.headers['Location']}/slice/original/{axis}/{i}.png"
                                                         "?c=127.5&w=255").data)
                       for axis, i in ((0, 20), (1, 30), (2, 12))])
    for a, b in zip(*images):
        assert a.std() > 0 and np.array_equal(a, b)


def test_downloads_decode(done_job, crop_path):
    from fedtensor.codec import decompress
    from fedtensor.io import read_volume

    c, job, url = done_job
    r = c.get(url + "/download/ftz")
    assert r.status_code == 200 and 'filename=head_crop.ftz' in r.headers["Content-Disposition"]
    dec = decompress(r.data)
    r = c.get(url + "/download/nifti")
    assert r.status_code == 200 and "filename=head_crop.decoded.nii.gz" in r.headers["Content-Disposition"]
    p = job.dir.parent / "check.nii.gz"
    p.write_bytes(r.data)
    nii = read_volume(p)
    p.unlink()
    assert np.array_equal(nii.data, dec.data) and np.allclose(nii.affine, read_volume(crop_path).affine)
    assert c.get(url + "/download/input").status_code == 404
    assert c.get(url + "/download/..%2F..%2Fsecret_key").status_code == 404


def test_jobs_belong_to_their_session(done_job, app):
    _, job, url = done_job
    other = app.test_client()
    for path in ("", "/compare", "/slice/original/0/0.png", "/download/ftz", "/download/nifti"):
        r = other.get(url + path)
        assert r.status_code == 404, path
        assert "no such job in this session" in error_text(r)
    for bad in ("/jobs/../data/secret_key", "/jobs/" + "0" * 31 + "g", "/jobs/abc"):
        assert other.get(bad).status_code == 404


def test_index_lists_the_sessions_jobs(done_job, app):
    c, job, url = done_job
    assert url in c.get("/").text
    assert url not in app.test_client().get("/").text


def test_lossless_job(client, crop_path):
    from fedtensor.codec import decompress
    from fedtensor.io import read_volume

    r, job = submit(client, sample="head_crop.nii.gz", mode="lossless")
    assert job.state == "done", job.error
    page = client.get(r.headers["Location"])
    assert 'id="m-psnr" data-value="inf"' in page.text and "∞ (exact)" in page.text
    assert np.array_equal(decompress(client.get(r.headers["Location"] + "/download/ftz").data).data,
                          read_volume(crop_path).data)
    assert job.finished.wait(60) and job.compare_state == "done"
    assert {row["codec"] for row in job.compare_rows} == {"jpeg2000-lossless", "zstd"}
    assert all(row["bytes"] > 0 for row in job.compare_rows)


def test_delete_needs_the_token_and_removes_the_files(client):
    r, job = submit(client, sample="head_crop.nii.gz", mode="lossless")
    url = r.headers["Location"]
    assert client.post(url + "/delete", data={}).status_code == 400
    assert job.dir.exists()
    r = client.post(url + "/delete", data={"csrf_token": csrf(client)})
    assert r.status_code == 303 and not job.dir.exists()
    assert client.get(url).status_code == 404


def test_a_job_whose_files_were_cleaned_away_is_410_not_500(client):
    r, job = submit(client, sample="head_crop.nii.gz", mode="lossless")
    url = r.headers["Location"]
    assert job.state == "done" and job.finished.wait(60)
    import shutil

    shutil.rmtree(job.dir)  # a temp cleaner ran
    for path in ("/slice/original/2/3.png", "/download/ftz", "/download/nifti"):
        r = client.get(url + path)
        assert r.status_code == 410 and "run the job again" in error_text(r), path


# ------------------------------------------------------------------------------------------ clean-up


def test_expired_jobs_are_swept(client, app):
    m = manager(app)
    r, job = submit(client, sample="head_crop.nii.gz", mode="lossless")
    assert job.dir.exists()
    assert m.sweep(time.time() + m.ttl_s + 1, every_s=0) >= 1
    assert not job.dir.exists() and client.get(r.headers["Location"]).status_code == 404


def test_a_session_keeps_at_most_max_jobs(app):
    m = manager(app)
    c = app.test_client()
    old, m.max_jobs = m.max_jobs, 2
    try:
        jobs = [submit(c, sample="head_crop.nii.gz", mode="lossless")[1] for _ in range(3)]
    finally:
        m.max_jobs = old
    assert not jobs[0].dir.exists() and jobs[1].dir.exists() and jobs[2].dir.exists()
    assert [j.id for j in m.list(jobs[0].sid)] == [jobs[2].id, jobs[1].id]


def test_the_whole_queue_is_capped_across_sessions(tmp_path):
    """A client that drops its cookie gets a new session each time: the server-wide cap still holds."""
    import threading

    from fedtensor.serve.jobs import Job, JobLimitError, JobManager, new_token

    m = JobManager(tmp_path, max_queued_total=2)
    gate = threading.Event()
    try:
        def job():
            sid = new_token()
            jid, d = m.new_dir(sid)
            return Job(jid, sid, "x", d, None, "CT", {})

        running = [m.submit(job(), lambda j: gate.wait(30) and {}, None) for _ in range(2)]
        extra = job()
        with pytest.raises(JobLimitError, match="busy"):
            m.submit(extra, lambda j: {}, None)
        assert not extra.dir.exists()
        gate.set()
        assert all(j.finished.wait(30) for j in running)
        m.submit(job(), lambda j: {}, None)  # room again
    finally:
        gate.set()
        m.close()


def test_close_removes_the_temp_area(tmp_path):
    from fedtensor.serve.jobs import JobManager, new_token

    m = JobManager(tmp_path)
    _, d = m.new_dir(new_token())
    (d / "x").write_bytes(b"1")
    assert m.root.parent == tmp_path
    m.close()
    assert not m.root.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ models, federation


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from fedtensor.nn import NetConfig, new_net, save_model
    from fedtensor.nn.checkpoint import read_model_bytes

    out = []
    for seed in (1, 2):
        d = tmp_path_factory.mktemp(f"model{seed}")
        save_model(new_net(NetConfig(channels=(8, 16), cond_hidden=8), seed=seed), d)
        data, _, manifest = read_model_bytes(d)
        out.append((data, manifest))
    return out


def test_federation_page(tmp_path, tiny_models):
    from fedtensor.serve.app import create_app

    app = create_app(tmp_path / "data", config={"FEDTENSOR_WEB": True, "FEDTENSOR_WEB_TMP": str(tmp_path)})
    try:
        c = app.test_client()
        r = c.get("/federation")
        assert r.status_code == 200
        assert "No global model has been published yet." in r.text and "no data yet" in r.text
        store = app.extensions["fedtensor_store"]
        a = store.publish(*tiny_models[0], {"round": 1, "clients": ["site-a", "site-b"], "n_clients": 2,
                                            "loss": 0.5, "val_loss": 0.6})
        b = store.publish(*tiny_models[1], {"round": 2, "clients": ["site-a", "site-c"], "n_clients": 2,
                                            "loss": 0.4})
        r = c.get("/federation")
        assert a.sha256 in r.text and b.sha256 in r.text
        assert "site-a, site-c" in r.text
        assert r.text.index('data-version="2"') < r.text.index('data-version="1"')  # newest first
        assert r.text.count("<polyline") == 1 and r.text.count("<circle") == 3  # 2 train + 1 val point
        form = c.get("/")
        assert '<option value="2">version 2 · round 2 · ' + b.sha256[:12] in form.text
    finally:
        app.extensions["fedtensor_web"].close()


def test_federation_page_shows_any_meta(tmp_path, tiny_models):
    """A version's meta is free-form JSON: values of unexpected types or beyond a double's range show as
    text or '—', and never break the page or its chart."""
    from fedtensor.serve.app import create_app

    app = create_app(tmp_path / "data", config={"FEDTENSOR_WEB": True, "FEDTENSOR_WEB_TMP": str(tmp_path)})
    try:
        store = app.extensions["fedtensor_store"]
        store.publish(*tiny_models[0], {"clients": 5, "round": 10**400, "loss": 10**400, "val_loss": "low"})
        store.publish(*tiny_models[1], {"round": 2, "loss": 1.7e308, "val_loss": -1.7e308,
                                        "clients": [{"site": "a"}, None]})
        r = app.test_client().get("/federation")
        assert r.status_code == 200
        chart = r.text[r.text.index('<section id="loss-curves">'):r.text.index("</section>")]
        assert "<circle" not in chart and "no data yet" in chart  # no point it could plot
        assert "<td>5</td>" in r.text and "<td>—</td>" in r.text  # clients; the text val_loss
        assert "1.7e+308" in r.text and "{&#39;site&#39;: &#39;a&#39;}, None" in r.text
    finally:
        app.extensions["fedtensor_web"].close()


def test_model_choice_is_used(app, client, tiny_models):
    """A chosen store version is exported and loaded; on an exact (max-error) stream it is not applied."""
    info = app.extensions["fedtensor_store"].publish(*tiny_models[0], {"round": 1})
    r, job = submit(client, sample="head_crop.nii.gz", mode="max_error", value="2", model=str(info.version))
    assert job.state == "done", job.error
    assert job.result["restore"]["model_id"] == info.sha256 and job.result["restore"]["applied"] is False
    assert (job.dir / "model" / "model.safetensors").exists()
    page = client.get(r.headers["Location"])
    assert f"model {info.sha256[:12]} (not applied: exact stream)" in page.text


@pytest.mark.slow
def test_psnr_and_bpv_modes_and_restoration(app, client, crop_path, tiny_models):
    """The lossy modes (JAX compilation for the crop's shape: slow) and restoration by a chosen model."""
    from fedtensor.codec import read_info

    r, job = submit(client, sample="head_crop.nii.gz", mode="psnr", value="38")
    assert job.state == "done", job.error
    assert job.result["psnr"] >= 38
    assert job.compare_state == "done" and all(row["psnr"] >= job.result["psnr"] for row in job.compare_rows)
    r, job = submit(client, sample="head_crop.nii.gz", mode="bpv", value="0.8")
    assert job.state == "done", job.error
    assert job.result["bpv"] <= 0.8
    assert read_info((job.dir / "result.ftz").read_bytes())["bits_per_voxel"] <= 0.8
    info = app.extensions["fedtensor_store"].publish(*tiny_models[1], {"round": 9})
    r, job = submit(client, sample="head_crop.nii.gz", mode="psnr", value="38", model=str(info.version))
    assert job.state == "done", job.error
    assert job.result["restore"]["applied"] is True and job.result["restore"]["model_id"] == info.sha256
    assert "restored PSNR" in client.get(r.headers["Location"]).text


def test_nifti_declaring_a_huge_volume_is_refused_before_reading(app, tmp_path):
    """A few hundred bytes of .nii.gz whose header claims 1024³ voxels: refused from the header alone."""
    import gzip

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "small.nii"))
    raw = bytearray((tmp_path / "small.nii").read_bytes())
    raw[42:48] = np.array([1024, 1024, 1024], "<i2").tobytes()  # dim[1..3] of the NIfTI-1 header
    c = app.test_client()
    r, _ = submit(c, volume=(io.BytesIO(gzip.compress(bytes(raw))), "bomb.nii.gz"), mode="lossless")
    assert r.status_code == 400
    assert error_text(r) == f"bomb.nii.gz: {1024 ** 3:,} voxels; this server accepts at most {DEFAULT_MAX_VOXELS:,}"


def test_deleting_a_running_job_stops_it_at_its_next_stage(tmp_path):
    """The worker is single: a deleted job must not keep every other job waiting behind its comparison."""
    import threading

    from fedtensor.serve.jobs import Job, JobManager, new_token

    m = JobManager(tmp_path)
    started, stages = threading.Event(), []
    try:
        sid = new_token()
        jid, d = m.new_dir(sid)

        def compare(job):  # the rival codecs, one stage each
            started.set()
            for k in range(200):
                job.check()
                stages.append(k)
                time.sleep(0.05)
            return [{"codec": "never"}]

        job = m.submit(Job(jid, sid, "x", d, None, "CT", {}), lambda j: {}, compare)
        assert started.wait(30)
        m.delete(sid, jid)
        assert job.finished.wait(5) and len(stages) < 200
        assert job.compare_rows == [] and not d.exists()
    finally:
        m.close()


def test_temp_areas_of_dead_servers_are_removed(tmp_path):
    import subprocess
    import sys

    from fedtensor.serve.jobs import JobManager

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan, alive, foreign = (tmp_path / f"fedtensor-web-{k}" for k in ("orphan", "alive", "nomarker"))
    for d, pid in ((orphan, dead.stdout.strip()), (alive, str(os.getpid())), (foreign, None)):
        (d / "sid" / "jid").mkdir(parents=True)
        if pid is not None:
            (d / ".owner-pid").write_text(pid)
    m = JobManager(tmp_path)
    try:
        assert not orphan.exists() and alive.exists() and foreign.exists() and m.root.exists()
    finally:
        m.close()


def test_display_names_keep_any_script_and_drop_controls():
    from fedtensor.serve.uploads import display_name

    assert display_name("脑部扫描.nii.gz") == "脑部扫描.nii.gz" and display_name("tést é.nii") == "tést é.nii"
    assert display_name("../../etc/passwd") == "passwd" and display_name("a\u202eb\x00.nii") == "a_b_.nii"
    assert display_name("हिंदी स्कैन.nii.gz") == "हिंदी स्कैन.nii.gz"  # combining marks are kept
    assert display_name("te\u0301st.nii") == "tést.nii"  # macOS's decomposed é, composed


def test_line_chart_skips_points_it_cannot_place():
    """Non-finite points, and finite ones whose spans would overflow a double, are left out; the rest
    are drawn at finite coordinates."""
    from fedtensor.serve import charts

    svg = charts.line_chart({"a": [(1, 1.7e308), (2, -1.7e308), (3, 1.0), (4, 2.0), (5, float("nan"))]},
                            title="t", xlabel="x", ylabel="y")
    assert svg.count("<circle") == 2 and "nan" not in svg and "inf" not in svg


def test_a_model_that_lowers_the_psnr_is_reported_not_shown(tmp_path, crop_path, monkeypatch):
    """The page showed (and offered to download) a restored volume below the target, with no warning."""
    import fedtensor.nn.infer as infer
    from fedtensor.io import Volume, read_volume
    from fedtensor.metrics import psnr
    from fedtensor.nn import NetConfig, new_net, save_model
    from fedtensor.serve.pipeline import Settings, run

    def worse(decoded, info, model, **_):
        return Volume(decoded.data.astype(np.float32) + 3.0, decoded.spacing, decoded.affine, decoded.meta)

    monkeypatch.setattr(infer, "restore", worse)
    model_dir = tmp_path / "model"
    save_model(new_net(NetConfig(channels=(8, 16), cond_hidden=8), seed=1), model_dir)
    vol = read_volume(crop_path)
    (tmp_path / "job").mkdir()
    out = run(vol, Settings("psnr", 40.0), tmp_path / "job", model_dir=model_dir)
    assert out["restore"]["declined"] is True and out["restore"]["psnr"] < out["psnr"]
    shown = read_volume(tmp_path / "job" / "decoded.nii.gz").data
    assert psnr(vol.data, shown) == pytest.approx(out["psnr"])  # the decoded volume, which meets the target
