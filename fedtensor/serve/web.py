"""The web interface (blueprint ``bp``, mounted at ``/``): compress and inspect a volume, watch the
federation. Views are thin: uploads, the compression pipeline, the comparison, slices and charts live
in :mod:`.uploads`, :mod:`.pipeline`, :mod:`.compare`, :mod:`.slices`, :mod:`.charts`; jobs and the
per-session temp area in :mod:`.jobs`.

Safety: every POST form carries a per-session CSRF token (Flask's signed session cookie holds it and a
random session id; checked with :func:`hmac.compare_digest`); uploads beyond ``MAX_CONTENT_LENGTH`` or
``FEDTENSOR_WEB_MAX_VOXELS`` and unreadable files get a page with a one-line message (status 4xx),
never a traceback; a job is visible only to the session that made it.

App config read here (all optional): ``FEDTENSOR_WEB_TMP`` (parent of the temp area; default the
system temp dir), ``FEDTENSOR_WEB_TTL_S`` (3600), ``FEDTENSOR_WEB_MAX_JOBS`` (6 per session),
``FEDTENSOR_WEB_MAX_VOXELS`` (32 M), ``FEDTENSOR_WEB_COMPARE`` (True: code the rival codecs),
``FEDTENSOR_SAMPLES`` (name → path of the volumes offered as samples; default the bundled CT head).
"""

from __future__ import annotations

import hmac
import math
import secrets
from pathlib import Path

from flask import (Blueprint, Response, abort, current_app, jsonify, redirect, render_template, request,
                   send_file, session, url_for)
from werkzeug.exceptions import HTTPException

from fedtensor.errors import FedtensorError
from fedtensor.serve import charts, compare, pipeline, slices
from fedtensor.serve.jobs import Job, JobLimitError, JobManager, new_token, valid_token
from fedtensor.serve.uploads import UploadError, display_name, read_upload, save_upload

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/web-static")

EXT = "fedtensor_web"
DEFAULT_MAX_VOXELS = 32 << 20
BUNDLED_SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "ct_head_uint8.nii.gz"
CT_PRESETS = {"brain": (40, 80), "subdural": (75, 215), "soft tissue": (40, 400), "lung": (-600, 1500),
              "bone": (400, 1800)}


@bp.record_once
def _setup(state) -> None:
    app = state.app
    tmp = app.config.get("FEDTENSOR_WEB_TMP")
    app.extensions[EXT] = JobManager(Path(tmp) if tmp else None,
                                     ttl_s=float(app.config.get("FEDTENSOR_WEB_TTL_S", 3600)),
                                     max_jobs=int(app.config.get("FEDTENSOR_WEB_MAX_JOBS", 6)),
                                     compare=bool(app.config.get("FEDTENSOR_WEB_COMPARE", True)))


def jobs() -> JobManager:
    return current_app.extensions[EXT]


def samples() -> dict[str, Path]:
    configured = current_app.config.get("FEDTENSOR_SAMPLES")
    if configured is not None:
        return {str(k): Path(v) for k, v in dict(configured).items()}
    return {BUNDLED_SAMPLE.name: BUNDLED_SAMPLE} if BUNDLED_SAMPLE.exists() else {}


def _store():
    return current_app.extensions.get("fedtensor_store")


# -- session, CSRF, errors ----------------------------------------------------------------------


def sid() -> str:
    """This browser's random session id (made on first use; lives in the signed session cookie)."""
    s = session.get("sid")
    if not valid_token(s):
        s = session["sid"] = new_token()
    return s


def csrf_token() -> str:
    tok = session.get("csrf")
    if not isinstance(tok, str) or len(tok) < 32:
        tok = session["csrf"] = secrets.token_urlsafe(32)
    return tok


def check_csrf() -> None:
    sent, want = request.form.get("csrf_token", ""), session.get("csrf")
    if not (isinstance(want, str) and want and hmac.compare_digest(sent.encode(), want.encode())):
        abort(400, "the form has expired or did not come from this site; reload the page and try again")


@bp.app_context_processor
def _inject():
    return {"csrf_token": csrf_token}


@bp.before_request
def _before():
    jobs().sweep()


@bp.after_request
def _headers(resp: Response) -> Response:
    # Everything is served from here: forbid framing and third-party content.
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                            "frame-ancestors 'none'; form-action 'self'")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    return resp


@bp.errorhandler(HTTPException)
def _http_error(err: HTTPException):
    if err.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        msg = "the upload is too large" + (f"; the limit is {limit / (1 << 20):.0f} MiB" if limit else "")
    else:
        msg = err.description or err.name
    if request.path.endswith("/status"):
        return jsonify(error=msg), err.code
    return render_template("error.html", code=err.code, title=err.name, message=msg), err.code


def _form_error(message: str, status: int = 400):
    return render_template("index.html", **_index_context(), error=message), status


# -- compress ------------------------------------------------------------------------------------


def _model_choices() -> list:
    store = _store()
    if store is None:
        return []
    try:
        return list(reversed(store.versions()))
    except FedtensorError:
        return []


def _index_context() -> dict:
    return {"samples": list(samples()), "models": _model_choices(), "modes": pipeline.MODES,
            "defaults": pipeline.DEFAULTS, "jobs": jobs().list(sid()), "form": request.form,
            "max_upload": current_app.config.get("MAX_CONTENT_LENGTH")}


@bp.get("/")
def index():
    return render_template("index.html", **_index_context(), error=None)


@bp.post("/compress")
def compress():
    check_csrf()  # reads the form: an oversized body stops here with 413
    try:
        settings = pipeline.parse_settings(request.form.get("mode"), request.form.get("value"),
                                           request.form.get("model"))
    except FedtensorError as e:
        return _form_error(str(e))
    if settings.model_version is not None:
        store = _store()
        if store is None or settings.model_version not in {v.version for v in store.versions()}:
            return _form_error(f"model version {settings.model_version} is not in the store")
    upload = request.files.get("volume")
    sample = request.form.get("sample", "")
    if upload is not None and upload.filename:
        name = display_name(upload.filename)
    elif sample:
        if sample not in samples():
            return _form_error(f"unknown sample {display_name(sample)!r}")
        name = sample
    else:
        return _form_error("choose a file to upload or a sample volume")
    jid, workdir = jobs().new_dir(sid())
    limit = int(current_app.config.get("FEDTENSOR_WEB_MAX_VOXELS", DEFAULT_MAX_VOXELS))
    try:
        if upload is not None and upload.filename:
            volume = read_upload(save_upload(upload.stream, workdir), name, limit)
        else:
            from fedtensor.io import read_volume

            volume = read_volume(samples()[name])
        if volume.data.size > limit:
            raise UploadError(f"{name}: {volume.data.size:,} voxels; this server accepts at most {limit:,}")
    except (UploadError, FedtensorError) as e:
        _rmtree(workdir)
        return _form_error(str(e))
    except Exception as e:  # noqa: BLE001 - an unreadable file must not become a stack-trace page
        _rmtree(workdir)
        current_app.logger.warning("unreadable upload %r: %s", name, type(e).__name__)
        return _form_error(f"{name}: cannot read this file ({type(e).__name__})")
    from fedtensor.bench.harness import guess_modality

    job = Job(jid, sid(), name, workdir, settings, guess_modality(volume.data, volume.meta),
              slices.window_stats(volume.data), settings.model_version, volume=volume)
    store = _store()
    try:
        jobs().submit(job, lambda j: _work(j, store), _compare)
    except JobLimitError as e:
        return _form_error(str(e), 429)
    return redirect(url_for("web.job_page", jid=jid), code=303)


def _rmtree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _work(job: Job, store) -> dict:
    model_dir = None
    if job.model_version is not None:
        job.stage = "fetching the model"
        model_dir = store.export(job.model_version, job.dir / "model")

    def progress(stage: str) -> None:
        job.check()
        job.stage = stage

    return pipeline.run(job.volume, job.settings, job.dir, model_dir=model_dir, progress=progress)


def _compare(job: Job) -> list:
    def progress(i: int, n: int, name: str) -> None:
        job.check()
        job.compare_stage = f"{i} of {n} codecs done" + (f"; coding {name}" if name else "")

    return compare.compare(job.volume, job.result["psnr"], progress=progress)


# -- results ---------------------------------------------------------------------------------------


_GONE = "this job's files are gone (the server's temp area was cleaned up); run the job again"


def _job(jid: str) -> Job:
    job = jobs().get(sid(), jid)
    if job is None:
        abort(404, "no such job in this session (jobs expire after an hour of inactivity and do not "
                   "survive a restart of the server)")
    return job


def _views(job: Job) -> list[dict]:
    """Per view: slice axis, count, middle index and a display size that honours the voxel spacing."""
    shape, spacing = job.result["view_shape"], job.result["view_spacing"]  # RAS order, as the slices are
    out = []
    for axis, name in enumerate(slices.VIEWS):
        a, b = [k for k in range(3) if k != axis]
        w_mm, h_mm = shape[a] * spacing[a], shape[b] * spacing[b]
        scale = 260 / max(w_mm, h_mm)
        out.append({"axis": axis, "name": name, "count": shape[axis], "index": shape[axis] // 2,
                    "width": round(w_mm * scale), "height": round(h_mm * scale)})
    return out


def _presets(job: Job) -> list[tuple[str, float, float]]:
    w = job.window

    def between(label, lo, hi):
        return (label, (lo + hi) / 2, max(hi - lo, 1e-6))

    # MR has no absolute scale: its presets are percentiles of the volume
    out = [between("auto (1–99 %)", w["p1"], w["p99"]), between("MR contrast (5–95 %)", w["p5"], w["p95"]),
           between("MR wide (min–99.9 %)", w["min"], w["p99.9"]), between("full range", w["min"], w["max"])]
    ct = [(f"CT {k}", float(c), float(wd)) for k, (c, wd) in CT_PRESETS.items()]
    return ct + out if job.modality == "CT" else out + ct


@bp.get("/jobs/<jid>")
def job_page(jid: str):
    job = _job(jid)
    ctx = {"job": job, "r": job.result}
    if job.state == "done":
        r = job.result
        ctx.update(views=_views(job), presets=_presets(job), diff_max=r["diff_scale"])
    return render_template("job.html", **ctx)


@bp.get("/jobs/<jid>/status")
def job_status(jid: str):
    return jsonify(_job(jid).status())


@bp.get("/jobs/<jid>/compare")
def job_compare(jid: str):
    """The size chart and table (an HTML fragment the result page inserts when the rivals are done)."""
    job = _job(jid)
    if job.state != "done":
        abort(409, "the compression has not finished")
    rows = [("fedtensor", job.result["ftz_bytes"], "")]
    for c in job.compare_rows:
        note = f" ({c['psnr']:.2f} dB)" if c.get("psnr") is not None else (
            "" if c["bytes"] else f"n/a: {c['reason']}")
        rows.append((c["short"], c["bytes"], note))
    p = job.result["psnr"]
    quality = "lossless" if p is None else f"PSNR ≥ {p:.2f} dB"
    svg = charts.bar_chart(rows, title=f"Storage size at the same quality ({quality})")
    return render_template("compare.html", job=job, svg=svg, quality=quality)


@bp.get("/jobs/<jid>/slice/<kind>/<int:axis>/<int:index>.png")
def job_slice(jid: str, kind: str, axis: int, index: int):
    job = _job(jid)
    if job.state != "done" or kind not in slices.KINDS or axis not in (0, 1, 2):
        abort(404)
    try:
        center = float(request.args.get("c", "nan"))
        width = float(request.args.get("w", "nan"))
        dmax = float(request.args.get("d", job.result["diff_scale"]))
    except ValueError:
        abort(400, "window centre, width and difference scale must be numbers")
    default = _presets(job)[0]
    center = center if math.isfinite(center) else default[1]
    width = width if math.isfinite(width) and width > 0 else default[2]
    dmax = dmax if math.isfinite(dmax) and dmax > 0 else 1.0
    try:
        png = slices.render(job.dir, kind, axis, index, center, width, dmax)
    except FileNotFoundError:
        abort(410, _GONE)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/jobs/<jid>/download/<what>")
def job_download(jid: str, what: str):
    job = _job(jid)
    files = {"ftz": ("result.ftz", ".ftz", "application/octet-stream"),
             "nifti": ("decoded.nii.gz", ".decoded.nii.gz", "application/gzip")}
    if what not in files or job.state != "done":
        abort(404)
    fname, suffix, mime = files[what]
    stem = job.name
    for ext in (".nii.gz", ".nii", ".zip"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    if not (job.dir / fname).is_file():
        abort(410, _GONE)
    return send_file(job.dir / fname, mimetype=mime, as_attachment=True, download_name=stem + suffix)


@bp.post("/jobs/<jid>/delete")
def job_delete(jid: str):
    check_csrf()
    _job(jid)
    jobs().delete(sid(), jid)
    return redirect(url_for("web.index"), code=303)


# -- federation ------------------------------------------------------------------------------------


@bp.get("/federation")
def federation():
    store = _store()
    versions, error = [], None
    if store is None:
        error = "this server has no model store"
    else:
        try:
            versions = store.versions()
        except FedtensorError as e:
            error = str(e)
    rounds_obj = current_app.extensions.get("fedtensor_rounds")
    try:
        rounds = rounds_obj.history() if rounds_obj is not None else []
    except FedtensorError as e:
        rounds, error = [], str(e)
    series: dict[str, list] = {"training loss": [], "validation loss": []}
    for v in versions:
        x = _number(v.meta.get("round", v.version))
        for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
            y = _number(v.meta.get(key))
            if x is not None and y is not None:
                series[label].append((x, y))
    svg = charts.line_chart(series, title="Global model loss per round", xlabel="round", ylabel="loss")
    return render_template("federation.html", versions=[_version_row(v) for v in reversed(versions)],
                           rounds=list(reversed(rounds)), svg=svg, error=error)


def _number(value) -> float | None:
    """``value`` as a finite float; None for anything else (a version's meta is free-form JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond a double
        return None
    return value if math.isfinite(value) else None


def _shown(value, limit: int = 60) -> str:
    """A free-form meta value as one short line of text ('—' when absent)."""
    if value is None or value == "" or value == []:
        return "—"
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _version_row(v) -> dict:
    """What the federation page shows of a version: its meta's known keys as text, whatever their types."""
    meta = v.meta
    losses = {k: _number(meta.get(k)) for k in ("loss", "val_loss")}
    return {"version": v.version, "created": v.created, "sha256": v.sha256, "round": _shown(meta.get("round")),
            "clients": _shown(meta.get("clients") or meta.get("n_clients")),
            **{k: "—" if x is None else f"{x:.5g}" for k, x in losses.items()}}
