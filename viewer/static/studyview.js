// The study view: series strip with thumbnails, the viewport (viewport.js) showing
// server-rendered frames fetched by the stack loader (stackloader.js), and the tag panel
// (tagpanel.js). This module holds what is current (series, slice, window) and the
// controls that change it: stack scrolling, window/level drag, presets, zoom/pan, cine.
//
// Smoothness: rendered frames are cached as ImageBitmaps and neighbours are prefetched;
// requests no longer useful are aborted; while the window is dragged a JPEG is asked for
// (one in flight, the latest wins) and the exact PNG once the drag stops. The previous
// picture stays on screen until the next one is decoded, so nothing flickers.
//
// Debug API: while a study is open, `globalThis.minipacsView` is its StudyView (null
// otherwise), for the tests (tests/test_viewer.py), the viewer benchmark
// (scripts/bench/viewer.py) and the browser console. Read, don't write: `index` (the
// slice shown, from 0), `stack` (its slices), `drawn` (exact frames drawn so far),
// `loading` (requests in flight, a Map), `shown` ({ key, bitmap } on the canvas),
// `message` (the viewport's message element), `key_(index, format)` (the key of a
// rendering), and `draw(key, bitmap)`, the one call through which frames reach the canvas
// (a benchmark may wrap it to time-stamp them).

import {
  first,
  instanceMetadata,
  searchInstances,
  searchSeries,
  text,
  thumbnailURL,
  values,
} from "./dicomweb.js";
import { button, el } from "./dom.js";
import { StackLoader } from "./stackloader.js";
import { TagPanel } from "./tagpanel.js";
import { Viewport } from "./viewport.js";

const PRESETS = {
  CT: [
    ["Brain", 40, 80],
    ["Lung", -600, 1500],
    ["Bone", 400, 1800],
    ["Abdomen", 60, 400],
    ["Soft tissue", 50, 350],
  ],
};

export function studyView(root, target, navigate) {
  const view = new StudyView(root, target, navigate);
  return { show: (next) => view.show(next), close: () => view.close() };
}

class StudyView {
  constructor(root, target, navigate) {
    this.navigate = navigate;
    this.study = target.study;
    this.controller = new AbortController();
    this.seriesList = [];
    this.series = "";
    this.stack = []; // { sop, frame, frames, number, rows, columns }
    this.index = 0;
    this.direction = 1;
    this.window = null; // null: the file's own; "auto"; or { center, width }
    this.preset = "file";
    this.dragging = false;
    this.metadata = new Map(); // sop → instance metadata
    this.cine = null;
    this.fps = 10;
    this.drawn = 0; // exact frames drawn (debug API)
    this.viewport = new Viewport(() => this.describe());
    this.loader = new StackLoader(this);
    this.tags = new TagPanel();
    this.build(root);
    this.load(target);
    globalThis.minipacsView = this; // the debug API (above)
  }

  // -- debug API names kept for the tests and the benchmark ------------------------------

  get loading() {
    return this.loader.loading;
  }

  get shown() {
    return this.viewport.shown;
  }

  get message() {
    return this.viewport.message;
  }

  key_(index, format) {
    return this.loader.key(index, format);
  }

  // -- the page ----------------------------------------------------------------------------

  build(root) {
    this.strip = el("nav", { class: "series", "aria-label": "Series" });
    this.counter = el("output", { class: "counter", "aria-live": "off" });
    this.slider = el("input", { type: "range", min: "1", max: "1", value: "1", "aria-label": "Image in series" });
    this.slider.addEventListener("input", () => this.go(Number(this.slider.value) - 1));
    this.presetSelect = el("select", { "aria-label": "Window preset", class: "preset" });
    this.presetSelect.addEventListener("change", () => this.applyPreset(this.presetSelect.value));
    this.fpsInput = el("input", { type: "number", min: "1", max: "60", value: String(this.fps), "aria-label": "Frames per second", class: "fps" });
    this.fpsInput.addEventListener("change", () => {
      this.fps = Math.min(60, Math.max(1, Number(this.fpsInput.value) || 10));
      if (this.cine) this.startCine();
    });
    this.playButton = button("▶ Cine", () => this.toggleCine(), { "aria-pressed": "false", class: "cine" });
    this.invertButton = button("Invert", () => this.toggleInvert(), { "aria-pressed": "false" });
    this.overlayButton = button("Overlays", () => this.toggleOverlays(), { "aria-pressed": "true" });
    this.tagButton = button("Tags", () => this.toggleTags(), { "aria-pressed": "false" });
    this.download = el("a", { class: "download", download: "" }, "Download");
    this.seriesZip = el("a", { class: "download", download: "", title: "The series' files and a DICOMDIR" }, "Series ZIP");
    const viewport = this.viewport;
    const toolbar = el(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Image tools" },
      el("label", {}, "Window ", this.presetSelect),
      this.invertButton,
      button("Fit", () => viewport.setFit(), { title: "Fit (F)" }),
      button("1:1", () => viewport.setZoom(1), { title: "Actual size (1)" }),
      button("−", () => viewport.setZoom(viewport.zoom / 1.25), { "aria-label": "Zoom out" }),
      button("+", () => viewport.setZoom(viewport.zoom * 1.25), { "aria-label": "Zoom in" }),
      this.playButton,
      el("label", {}, "fps ", this.fpsInput),
      this.overlayButton,
      this.tagButton,
      this.download,
      this.seriesZip,
      el("a", { href: "/", "data-link": "" }, "Studies"),
    );
    const centre = el("section", { class: "viewer" }, toolbar, viewport.stage, el("div", { class: "scroll" }, this.slider, this.counter));
    root.append(el("div", { class: "study-view" }, this.strip, centre, this.tags.node));
    this.listen();
  }

  listen() {
    const signal = this.controller.signal;
    const stage = this.viewport.stage;
    let wheel = 0;
    stage.addEventListener(
      "wheel",
      (event) => {
        event.preventDefault();
        if (event.ctrlKey) {
          this.viewport.setZoom(this.viewport.zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
          return;
        }
        // A mouse notch (|delta| ≥ 50 px, or lines) is one slice; a touchpad's small
        // deltas add up to one slice per 100 px.
        const delta = event.deltaY * (event.deltaMode === 1 ? 40 : 1);
        if (Math.abs(delta) >= 50) {
          // A busy browser merges queued notches into one event (deltaY 200, 300…).
          wheel = 0;
          this.go(this.index + Math.sign(delta) * Math.max(1, Math.round(Math.abs(delta) / 100)));
          return;
        }
        wheel += delta;
        if (Math.abs(wheel) >= 100) {
          this.go(this.index + Math.sign(wheel));
          wheel = 0;
        }
      },
      { passive: false, signal },
    );
    stage.addEventListener("pointerdown", (event) => this.startDrag(event), { signal });
    stage.addEventListener("contextmenu", (event) => event.preventDefault(), { signal });
    document.addEventListener("keydown", (event) => this.key(event), { signal });
  }

  key(event) {
    if (event.target.closest("input, select, textarea") || event.altKey || event.ctrlKey || event.metaKey) return;
    const viewport = this.viewport;
    const actions = {
      ArrowDown: () => this.go(this.index + 1),
      ArrowRight: () => this.go(this.index + 1),
      PageDown: () => this.go(this.index + 10),
      ArrowUp: () => this.go(this.index - 1),
      ArrowLeft: () => this.go(this.index - 1),
      PageUp: () => this.go(this.index - 10),
      Home: () => this.go(0),
      End: () => this.go(this.stack.length - 1),
      i: () => this.toggleInvert(),
      f: () => viewport.setFit(),
      1: () => viewport.setZoom(1),
      "+": () => viewport.setZoom(viewport.zoom * 1.25),
      "-": () => viewport.setZoom(viewport.zoom / 1.25),
      o: () => this.toggleOverlays(),
      t: () => this.toggleTags(),
      c: () => this.toggleCine(),
    };
    const action = actions[event.key];
    if (!action || event.target.closest("button, a")) return;
    event.preventDefault();
    action();
  }

  // -- loading the study and a series ----------------------------------------------------

  async load(target) {
    document.title = "Study — minipacs";
    try {
      this.seriesList = await searchSeries(this.study, this.controller.signal);
    } catch (error) {
      this.fail(error);
      return;
    }
    this.seriesList.sort((a, b) => (first(a, "00200011") ?? 1e9) - (first(b, "00200011") ?? 1e9));
    this.strip.replaceChildren(...this.seriesList.map((series) => this.seriesButton(series)));
    if (!this.seriesList.length) {
      this.viewport.showMessage("This study has no series.");
      return;
    }
    await this.show(target);
    // The thumbnails would compete on the server with the first image: they are asked
    // for once it is drawn, or has failed, or there is none to draw.
    await this.currentLoad;
    if (!this.controller.signal.aborted) this.loadThumbnails();
  }

  seriesButton(series) {
    const uid = first(series, "0020000E");
    const label = text(series, "0008103E") || `Series ${first(series, "00200011") ?? ""}`;
    const count = first(series, "00201209") || 0;
    return el(
      "a",
      { href: `/study/${this.study}/series/${uid}`, "data-link": "", class: "series-item", "data-series": uid },
      el("img", { "data-src": thumbnailURL(this.study, uid), alt: "", width: "96", height: "96" }),
      el("span", { class: "label" }, label),
      el("span", { class: "count" }, `${text(series, "00080060")} · ${count} image${count === 1 ? "" : "s"}`),
    );
  }

  loadThumbnails() {
    for (const image of this.strip.querySelectorAll("img[data-src]")) {
      image.src = image.dataset.src;
      image.removeAttribute("data-src");
    }
  }

  async show(target) {
    const series = target.series || first(this.seriesList[0], "0020000E");
    if (series !== this.series) {
      await this.openSeries(series);
      if (series !== this.series) return;
    }
    let index = 0;
    if (target.sop) {
      index = this.stack.findIndex((s) => s.sop === target.sop && s.frame === (target.frame || 1));
      if (index < 0) index = Math.max(0, this.stack.findIndex((s) => s.sop === target.sop));
    }
    this.go(index, { fromUrl: true });
  }

  async openSeries(series) {
    this.stopCine();
    this.series = series;
    this.seriesZip.href = `/studies/${this.study}/series/${series}/archive`;
    this.stack = [];
    for (const item of this.strip.querySelectorAll(".series-item")) {
      item.setAttribute("aria-current", item.dataset.series === series ? "true" : "false");
    }
    let instances;
    try {
      instances = await searchInstances(this.study, series, this.controller.signal);
    } catch (error) {
      this.fail(error);
      return;
    }
    if (series !== this.series) return;
    instances.sort((a, b) => (first(a, "00200013") ?? 1e9) - (first(b, "00200013") ?? 1e9));
    for (const instance of instances) {
      const frames = Number(first(instance, "00280008") || 1);
      for (let frame = 1; frame <= frames; frame += 1) {
        this.stack.push({
          sop: first(instance, "00080018"),
          frame,
          frames,
          number: first(instance, "00200013"),
          rows: Number(first(instance, "00280010") || 0),
          columns: Number(first(instance, "00280011") || 0),
        });
      }
    }
    this.slider.max = String(Math.max(1, this.stack.length));
    this.setPresets();
    if (!this.stack.length) this.viewport.showMessage("This series has no images.");
  }

  // -- moving through the stack ----------------------------------------------------------

  go(index, { fromUrl = false } = {}) {
    if (!this.stack.length) return;
    const next = Math.min(this.stack.length - 1, Math.max(0, index));
    if (next !== this.index) this.direction = next > this.index ? 1 : -1;
    this.index = next;
    const slice = this.stack[next];
    this.slider.value = String(next + 1);
    this.counter.value = `${next + 1} / ${this.stack.length}`;
    this.counter.textContent = this.counter.value;
    const frame = slice.frames > 1 ? `?frame=${slice.frame}` : "";
    const url = `/study/${this.study}/series/${this.series}/instance/${slice.sop}${frame}`;
    if (!fromUrl || location.pathname + location.search !== url) history.replaceState({}, "", url);
    this.download.href = `/wado?requestType=WADO&studyUID=${this.study}&seriesUID=${this.series}&objectUID=${slice.sop}&contentType=application%2Fdicom&transferSyntax=*`;
    this.showCurrent();
    this.loader.prefetch();
    this.loadMetadata(slice.sop);
  }

  // Scrolling faster than the server renders: one request for "the current slice" in
  // flight; when it lands, the slice current by then is asked for. Frames are dropped,
  // the picture keeps moving, and the server renders nothing nobody will see.
  showCurrent() {
    const key = this.loader.key(this.index, "png");
    if (this.loader.bitmaps.has(key) || this.loader.loading.has(key) || !this.currentLoad) {
      this.currentLoad = this.loader
        .request(this.index, "png", { current: true })
        .catch(() => {})
        .finally(() => {
          this.currentLoad = null;
          if (this.currentStale) {
            this.currentStale = false;
            this.showCurrent();
          }
        });
      return;
    }
    this.currentStale = true;
    this.loader.placeholder(this.index);
  }

  // The one way a frame reaches the canvas (key null: a stand-in until the exact one).
  draw(key, bitmap) {
    if (key) this.drawn += 1;
    this.viewport.show(key, bitmap);
  }

  exactShown() {
    const shown = this.viewport.shown;
    return Boolean(shown) && shown.key === this.loader.key(this.index, "png");
  }

  isCurrent(key) {
    if (!this.stack.length) return false;
    const format = this.dragging ? "jpeg" : "png";
    return key === this.loader.key(this.index, format) || (this.dragging && key === this.loader.key(this.index, "jpeg"));
  }

  // What the viewport shows now, for its drawing and overlays.
  describe() {
    const slice = this.stack[this.index];
    const meta = slice && this.metadata.get(slice.sop);
    return { slice, meta, position: this.index + 1, total: this.stack.length, window: this.windowText(meta) };
  }

  windowText(meta) {
    if (this.window === "auto") return "WC/WW auto";
    const window = this.window || fileWindow(meta);
    if (!window) return meta ? "WC/WW auto" : "WC/WW file";
    return `WC ${Math.round(window.center)} WW ${Math.round(window.width)}`;
  }

  // -- window/level, pan and zoom by dragging --------------------------------------------

  startDrag(event) {
    if (!this.stack.length) return;
    const viewport = this.viewport;
    const stage = viewport.stage;
    stage.focus();
    stage.setPointerCapture(event.pointerId);
    const start = [event.clientX, event.clientY];
    const pan = [...viewport.pan];
    const mode = event.button === 1 || event.shiftKey ? "pan" : event.button === 2 ? "zoom" : "window";
    const zoom = viewport.zoom;
    const window = this.startWindow();
    const move = (moved) => {
      const dx = moved.clientX - start[0];
      const dy = moved.clientY - start[1];
      if (mode === "pan") viewport.panTo([pan[0] + dx, pan[1] + dy]);
      else if (mode === "zoom") viewport.setZoom(zoom * Math.exp(-dy / 200));
      else if (Math.abs(dx) + Math.abs(dy) > 1) {
        const step = Math.max(1, window.width / 256);
        this.window = { center: window.center + dy * step, width: Math.max(1, window.width + dx * step) };
        this.preset = "custom";
        this.presetSelect.value = "custom";
        this.dragging = true;
        this.dragRender();
      }
    };
    const up = () => {
      stage.removeEventListener("pointermove", move);
      stage.removeEventListener("pointerup", up);
      stage.removeEventListener("pointercancel", up);
      if (this.dragging) {
        this.dragging = false;
        this.loader.request(this.index, "png", { current: true });
        this.loader.prefetch();
      }
    };
    stage.addEventListener("pointermove", move);
    stage.addEventListener("pointerup", up);
    stage.addEventListener("pointercancel", up);
  }

  startWindow() {
    if (this.window && this.window !== "auto") return this.window;
    const meta = this.metadata.get(this.stack[this.index].sop);
    const file = fileWindow(meta);
    if (file) return file;
    const bits = Number(first(meta, "00280101") || 12);
    const slope = Number(first(meta, "00281053") || 1);
    const intercept = Number(first(meta, "00281052") || 0);
    const signed = Number(first(meta, "00280103") || 0) === 1;
    const low = (signed ? -(2 ** (bits - 1)) : 0) * slope + intercept;
    const high = (signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1) * slope + intercept;
    return { center: (low + high) / 2, width: Math.max(1, high - low) };
  }

  // While dragging: one JPEG in flight; when it lands, ask for the latest window.
  dragRender() {
    this.viewport.updateOverlays();
    if (this.dragInFlight) {
      this.dragPending = true;
      return;
    }
    this.dragInFlight = true;
    this.dragPending = false;
    this.loader.abort((key) => !key.endsWith("|jpeg"));
    this.loader
      .request(this.index, "jpeg", { current: true, quality: 70 })
      .catch(() => {})
      .finally(() => {
        this.dragInFlight = false;
        if (this.dragPending && this.dragging) this.dragRender();
      });
  }

  setPresets() {
    const slice = this.stack[0];
    const modality = this.seriesList.map((s) => (first(s, "0020000E") === this.series ? text(s, "00080060") : "")).join("");
    const options = [["file", "File"], ["auto", "Auto"]];
    for (const [name, center, width] of PRESETS[modality] || []) options.push([`${center},${width}`, `${name} (${center}/${width})`]);
    options.push(["custom", "Custom"]);
    this.presetSelect.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
    this.presetSelect.querySelector("[value=custom]").disabled = true;
    this.presetSelect.value = this.preset === "custom" && slice ? "custom" : this.preset;
    if (!this.presetSelect.value) this.applyPreset("file");
  }

  applyPreset(value) {
    this.preset = value;
    this.presetSelect.value = value;
    if (value === "file") this.window = null;
    else if (value === "auto") this.window = "auto";
    else if (value !== "custom") {
      const [center, width] = value.split(",").map(Number);
      this.window = { center, width };
    }
    if (this.stack.length) {
      this.loader.request(this.index, "png", { current: true });
      this.loader.prefetch();
    }
  }

  // -- toggles and cine --------------------------------------------------------------------

  toggleInvert() {
    this.invertButton.setAttribute("aria-pressed", String(this.viewport.toggleInvert()));
  }

  toggleOverlays() {
    this.overlayButton.setAttribute("aria-pressed", String(this.viewport.toggleOverlays()));
  }

  toggleTags() {
    this.tags.toggle();
    this.tagButton.setAttribute("aria-pressed", String(this.tags.open));
    this.renderTags();
  }

  toggleCine() {
    if (this.cine) this.stopCine();
    else this.startCine();
  }

  startCine() {
    clearInterval(this.cine);
    this.cine = setInterval(() => this.go(this.index + 1 < this.stack.length ? this.index + 1 : 0), 1000 / this.fps);
    this.playButton.textContent = "❚❚ Stop";
    this.playButton.setAttribute("aria-pressed", "true");
  }

  stopCine() {
    clearInterval(this.cine);
    this.cine = null;
    this.playButton.textContent = "▶ Cine";
    this.playButton.setAttribute("aria-pressed", "false");
  }

  // -- metadata ----------------------------------------------------------------------------

  // The current instance's metadata, for the overlays, the pixel aspect and the tag panel.
  // Asked for after a short pause (longer during cine), so scrolling past an instance
  // does not fetch it.
  async loadMetadata(sop) {
    if (this.metadata.has(sop)) {
      this.viewport.updateOverlays();
      this.renderTags();
      return;
    }
    clearTimeout(this.metadataTimer);
    this.metadataTimer = setTimeout(async () => {
      try {
        const meta = await instanceMetadata(this.study, this.series, sop, this.controller.signal);
        this.metadata.set(sop, meta);
        if (this.stack[this.index]?.sop === sop) {
          this.viewport.redraw(); // its pixel aspect, and the overlays
          this.renderTags();
        }
      } catch (error) {
        if (error.name !== "AbortError") this.viewport.showMessage(`Cannot read the instance's tags: ${error.message}`);
      }
    }, this.cine ? 250 : 30);
  }

  renderTags() {
    this.tags.render(this.metadata.get(this.stack[this.index]?.sop));
  }

  // -- failing and closing -----------------------------------------------------------------

  fail(error) {
    if (error.name === "AbortError") return;
    this.viewport.showMessage(error.status === 404 ? "This study is not in the archive." : `Server error: ${error.message}`);
  }

  close() {
    this.stopCine();
    clearTimeout(this.metadataTimer);
    this.controller.abort();
    this.loader.close();
    this.viewport.close();
    globalThis.minipacsView = null;
  }
}

function fileWindow(meta) {
  const center = values(meta, "00281050")[0];
  const width = values(meta, "00281051")[0];
  return center !== undefined && width !== undefined ? { center: Number(center), width: Number(width) } : null;
}
