// fedtensor web interface: form helpers, job status polling, slice viewer. No dependencies.
"use strict";

function setupForm() {
  const form = document.getElementById("compress-form");
  if (!form) return;
  const value = document.getElementById("value");
  const unit = document.getElementById("value-unit");
  const label = document.getElementById("value-label");
  const radios = form.querySelectorAll("input[name=mode]");
  function sync(changed) {
    const r = form.querySelector("input[name=mode]:checked");
    if (!r) return;
    label.hidden = r.value === "lossless";
    unit.textContent = r.dataset.unit;
    if (changed) value.value = r.dataset.default;
  }
  radios.forEach((r) => r.addEventListener("change", () => sync(true)));
  sync(false);
  // Refuse an oversized file before uploading it (the server refuses it too, with a 413 page).
  const limit = Number(form.dataset.maxUpload || 0);
  const err = document.getElementById("client-error");
  form.addEventListener("submit", (ev) => {
    const f = document.getElementById("volume").files[0];
    if (limit && f && f.size > limit) {
      ev.preventDefault();
      err.textContent = "the file is too large: " + (f.size / 1048576).toFixed(1) + " MiB; the limit is " +
        (limit / 1048576).toFixed(0) + " MiB";
      err.hidden = false;
      return;
    }
    document.getElementById("compress-button").disabled = true;
    document.getElementById("compress-button").textContent = "Uploading…";
  });
}

function setupJob() {
  const job = document.getElementById("job");
  if (!job) return;
  const state = job.dataset.state, cstate = job.dataset.compareState;
  if (state === "queued" || state === "running") {
    poll(job.dataset.statusUrl, (s) => {
      const stage = document.getElementById("stage");
      if (stage) stage.textContent = s.stage;
      if (s.state !== "queued" && s.state !== "running") { location.reload(); return true; }
      return false;
    });
  } else if (state === "done" && (cstate === "pending" || cstate === "running")) {
    poll(job.dataset.statusUrl, (s) => {
      const stage = document.getElementById("compare-stage");
      if (stage) stage.textContent = s.compare_stage;
      if (s.compare_state === "done") {
        fetch(job.dataset.compareUrl, { credentials: "same-origin" }).then((r) => r.text()).then((html) => {
          document.getElementById("compare").innerHTML = html;
        });
        return true;
      }
      if (s.compare_state === "failed" || s.compare_state === "off") {
        document.getElementById("compare").textContent = "the comparison failed: " + s.compare_stage;
        return true;
      }
      return false;
    });
  } else if (state === "done" && cstate === "done") {
    fetch(job.dataset.compareUrl, { credentials: "same-origin" }).then((r) => r.text()).then((html) => {
      document.getElementById("compare").innerHTML = html;
    });
  }
  setupViewer();
}

function poll(url, handle) {
  const tick = () => {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then((r) => r.json())
      .then((s) => { if (!handle(s)) setTimeout(tick, 700); })
      .catch(() => setTimeout(tick, 2000));
  };
  setTimeout(tick, 500);
}

function setupViewer() {
  const viewer = document.getElementById("viewer");
  if (!viewer) return;
  const base = viewer.dataset.sliceUrl; // .../slice/KIND/0/0.png
  const preset = document.getElementById("preset");
  const center = document.getElementById("wl-center");
  const width = document.getElementById("wl-width");
  const dmax = document.getElementById("diff-max");
  function url(kind, axis, index) {
    const q = new URLSearchParams({ c: center.value, w: width.value, d: dmax.value });
    return base.replace("/KIND/0/0.png", "/" + kind + "/" + axis + "/" + index + ".png") + "?" + q;
  }
  function draw(view) {
    const axis = view.dataset.axis, slider = view.querySelector(".slider");
    view.querySelector(".slice-no").textContent = Number(slider.value) + 1;
    view.querySelectorAll("img.slice").forEach((img) => { img.src = url(img.dataset.kind, axis, slider.value); });
  }
  const views = viewer.querySelectorAll(".view");
  const drawAll = () => views.forEach(draw);
  views.forEach((v) => {
    v.querySelector(".slider").addEventListener("input", () => draw(v));
    // Scroll over the images to move through slices.
    v.querySelector(".panes").addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const s = v.querySelector(".slider");
      s.value = Math.min(Number(s.max), Math.max(0, Number(s.value) + (ev.deltaY > 0 ? 1 : -1)));
      draw(v);
    }, { passive: false });
  });
  preset.addEventListener("change", () => {
    if (preset.value === "custom") return;
    const [c, w] = preset.value.split(",");
    center.value = Number(c).toPrecision(6) * 1;
    width.value = Number(w).toPrecision(6) * 1;
    drawAll();
  });
  [center, width].forEach((el) => el.addEventListener("change", () => { preset.value = "custom"; drawAll(); }));
  dmax.addEventListener("change", drawAll);
  drawAll();
}

document.addEventListener("DOMContentLoaded", () => { setupForm(); setupJob(); });
