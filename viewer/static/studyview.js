// The study view: series strip with thumbnails, one viewport showing server-rendered
// frames on a canvas (stack scrolling, window/level drag, presets, invert, zoom/pan, cine,
// overlays), and the current instance's tag panel.
//
// Smoothness: rendered frames are cached as ImageBitmaps and neighbours are prefetched;
// requests no longer useful are aborted; while the window is dragged a JPEG is asked for
// (one in flight, the latest wins) and the exact PNG once the drag stops. The previous
// picture stays on screen until the next one is decoded, so nothing flickers.

import {
  fetchBitmap,
  first,
  formatDate,
  instanceMetadata,
  renderedURL,
  searchInstances,
  searchSeries,
  text,
  thumbnailURL,
  values,
} from "./dicomweb.js";
import { button, el } from "./studylist.js";

const PRESETS = {
  CT: [
    ["Brain", 40, 80],
    ["Lung", -600, 1500],
    ["Bone", 400, 1800],
    ["Abdomen", 60, 400],
    ["Soft tissue", 50, 350],
  ],
};
const PREFETCH = 10; // slices ahead in the scroll direction (and half of it behind)
const PARALLEL = 4; // rendered requests in flight (waitress serves 8 at once)
const CACHE = 160; // bitmaps kept
const MAX_SIDE = 2048; // larger images are rendered down to this on the server

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
    this.stack = []; // { sop, frame, number, rows, columns }
    this.index = 0;
    this.window = null; // null: the file's own; "auto"; or { center, width }
    this.preset = "file";
    this.invert = false;
    this.zoom = 1;
    this.fit = true;
    this.pan = [0, 0];
    this.overlays = true;
    this.bitmaps = new Map(); // key → ImageBitmap (insertion order = age)
    this.loading = new Map(); // key → AbortController
    this.shown = null; // { key, bitmap }
    this.metadata = new Map(); // sop → instance metadata
    this.cine = null;
    this.fps = 10;
    this.direction = 1;
    this.drawn = 0; // frames drawn: the benchmark reads it
    this.build(root);
    this.load(target);
    globalThis.minipacsView = this; // tests and the benchmark read its state
  }

  build(root) {
    this.strip = el("nav", { class: "series", "aria-label": "Series" });
    this.canvas = el("canvas", { class: "image", role: "img", "aria-label": "Image" });
    this.message = el("p", { class: "message", role: "alert", hidden: "" });
    this.corners = ["tl", "tr", "bl", "br"].map((c) => el("div", { class: `corner ${c}` }));
    this.counter = el("output", { class: "counter", "aria-live": "off" });
    this.slider = el("input", { type: "range", min: "1", max: "1", value: "1", "aria-label": "Image in series" });
    this.slider.addEventListener("input", () => this.go(Number(this.slider.value) - 1));
    this.stage = el("div", { class: "stage", tabindex: "0", "aria-label": "Viewport: wheel or arrows scroll, drag sets the window" }, this.canvas, ...this.corners, this.message);
    this.tags = el("aside", { class: "tags", "aria-label": "DICOM tags", hidden: "" });
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
    const toolbar = el(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Image tools" },
      el("label", {}, "Window ", this.presetSelect),
      this.invertButton,
      button("Fit", () => this.setFit(), { title: "Fit (F)" }),
      button("1:1", () => this.setZoom(1), { title: "Actual size (1)" }),
      button("−", () => this.setZoom(this.zoom / 1.25), { "aria-label": "Zoom out" }),
      button("+", () => this.setZoom(this.zoom * 1.25), { "aria-label": "Zoom in" }),
      this.playButton,
      el("label", {}, "fps ", this.fpsInput),
      this.overlayButton,
      this.tagButton,
      this.download,
      el("a", { href: "/", "data-link": "" }, "Studies"),
    );
    const centre = el("section", { class: "viewer" }, toolbar, this.stage, el("div", { class: "scroll" }, this.slider, this.counter));
    root.append(el("div", { class: "study-view" }, this.strip, centre, this.tags));
    this.listen();
  }

  listen() {
    const signal = this.controller.signal;
    this.resize = new ResizeObserver(() => this.fitCanvas());
    this.resize.observe(this.stage);
    let wheel = 0;
    this.stage.addEventListener(
      "wheel",
      (event) => {
        event.preventDefault();
        if (event.ctrlKey) {
          this.setZoom(this.zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
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
    this.stage.addEventListener("pointerdown", (event) => this.startDrag(event), { signal });
    this.stage.addEventListener("contextmenu", (event) => event.preventDefault(), { signal });
    document.addEventListener("keydown", (event) => this.key(event), { signal });
  }

  key(event) {
    if (event.target.closest("input, select, textarea") || event.altKey || event.ctrlKey || event.metaKey) return;
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
      f: () => this.setFit(),
      1: () => this.setZoom(1),
      "+": () => this.setZoom(this.zoom * 1.25),
      "-": () => this.setZoom(this.zoom / 1.25),
      o: () => this.toggleOverlays(),
      t: () => this.toggleTags(),
      c: () => this.toggleCine(),
    };
    const action = actions[event.key];
    if (!action || event.target.closest("button, a")) return;
    event.preventDefault();
    action();
  }

  // -- loading the study and a series --------------------------------------------------

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
    setTimeout(() => this.loadThumbnails(), 1500); // also when no image can be drawn
    if (!this.seriesList.length) {
      this.showMessage("This study has no series.");
      return;
    }
    await this.show(target);
  }

  seriesButton(series) {
    const uid = first(series, "0020000E");
    const label = text(series, "0008103E") || `Series ${first(series, "00200011") ?? ""}`;
    const count = first(series, "00201209") || 0;
    const link = el(
      "a",
      { href: `/study/${this.study}/series/${uid}`, "data-link": "", class: "series-item", "data-series": uid },
      el("img", { "data-src": thumbnailURL(this.study, uid), alt: "", width: "96", height: "96" }),
      el("span", { class: "label" }, label),
      el("span", { class: "count" }, `${text(series, "00080060")} · ${count} image${count === 1 ? "" : "s"}`),
    );
    return link;
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
    if (!this.stack.length) this.showMessage("This series has no images.");
  }

  // -- moving through the stack --------------------------------------------------------

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
    this.prefetch();
    this.loadMetadata(slice.sop);
  }

  // Scrolling faster than the server renders: one request for "the current slice" in
  // flight; when it lands, the slice current by then is asked for. Frames are dropped,
  // the picture keeps moving, and the server renders nothing nobody will see.
  showCurrent() {
    const key = this.key_(this.index, "png");
    if (this.bitmaps.has(key) || this.loading.has(key) || !this.currentLoad) {
      this.currentLoad = this.request(this.index, "png", { current: true })
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
    this.placeholder(this.index);
  }

  exactShown() {
    return this.shown && this.shown.key === this.key_(this.index, "png");
  }

  key_(index, format) {
    const slice = this.stack[index];
    const window = this.window === null ? "file" : this.window === "auto" ? "auto" : `${this.window.center},${this.window.width}`;
    return `${this.series}|${slice.sop}|${slice.frame}|${window}|${format}`;
  }

  url(index, format, quality) {
    const slice = this.stack[index];
    const big = Math.max(slice.rows, slice.columns) > MAX_SIDE;
    const scale = big ? MAX_SIDE / Math.max(slice.rows, slice.columns) : 1;
    const viewport = big ? [Math.round(slice.columns * scale), Math.round(slice.rows * scale)] : null;
    return renderedURL(this.study, this.series, slice.sop, slice.frame, { window: this.window, format, quality, viewport });
  }

  // Ask for frame `index`; the current one is drawn when it arrives.
  request(index, format, { current = false, quality = 90 } = {}) {
    const key = this.key_(index, format);
    const cached = this.bitmaps.get(key);
    if (cached) {
      this.bitmaps.delete(key); // refresh its age
      this.bitmaps.set(key, cached);
      if (current) this.draw(key, cached);
      return Promise.resolve(cached);
    }
    if (current) this.placeholder(index);
    if (this.loading.has(key)) {
      const loading = this.loading.get(key);
      loading.current ||= current; // the request that loads it draws it: once
      return loading.promise;
    }
    const controller = new AbortController();
    const promise = fetchBitmap(this.url(index, format, quality), controller.signal).then(
      (bitmap) => {
        this.loading.delete(key);
        this.remember(key, bitmap);
        if (this.isCurrent(key)) this.draw(key, bitmap);
        else if (controller.current && !this.exactShown()) this.draw(null, bitmap); // moved on: show it meanwhile
        this.prefetch();
        return bitmap;
      },
      (error) => {
        this.loading.delete(key);
        if (error.name !== "AbortError" && this.isCurrent(key)) this.showMessage(`Cannot display this image: ${error.message}`);
        throw error;
      },
    );
    promise.catch(() => {});
    controller.index = index;
    controller.current = current;
    controller.promise = promise;
    this.loading.set(key, controller);
    return promise;
  }

  isCurrent(key) {
    if (!this.stack.length) return false;
    const format = this.dragging ? "jpeg" : "png";
    return key === this.key_(this.index, format) || (this.dragging && key === this.key_(this.index, "jpeg"));
  }

  // Keep the slice's nearest rendering on screen while the exact one loads.
  placeholder(index) {
    const slice = this.stack[index];
    const prefix = `${this.series}|${slice.sop}|${slice.frame}|`;
    for (const [key, bitmap] of [...this.bitmaps].reverse()) {
      if (key.startsWith(prefix)) {
        this.draw(null, bitmap);
        return;
      }
    }
  }

  prefetch() {
    if (!this.stack.length || this.dragging) return;
    const wanted = [];
    for (let step = 1; step <= PREFETCH; step += 1) {
      wanted.push(this.index + step * this.direction);
      if (step <= PREFETCH / 2) wanted.push(this.index - step * this.direction);
    }
    const keep = new Set(wanted.filter((i) => i >= 0 && i < this.stack.length).map((i) => this.key_(i, "png")));
    keep.add(this.key_(this.index, "png"));
    for (const [key, controller] of this.loading) {
      if (!keep.has(key) && !key.endsWith("|jpeg") && !controller.current) {
        controller.abort(); // a prefetch we scrolled away from, or for an old window
        this.loading.delete(key);
      }
    }
    for (const index of wanted) {
      if (this.loading.size >= PARALLEL) break;
      if (index < 0 || index >= this.stack.length) continue;
      const key = this.key_(index, "png");
      if (!this.bitmaps.has(key) && !this.loading.has(key)) this.request(index, "png");
    }
  }

  remember(key, bitmap) {
    this.bitmaps.set(key, bitmap);
    while (this.bitmaps.size > CACHE) {
      const [oldest, old] = this.bitmaps.entries().next().value;
      if (this.shown && this.shown.bitmap === old) {
        this.bitmaps.delete(oldest);
        this.bitmaps.set(oldest, old);
        continue;
      }
      this.bitmaps.delete(oldest);
      old.close();
    }
  }

  // -- drawing ---------------------------------------------------------------------------

  fitCanvas() {
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = this.stage.getBoundingClientRect();
    this.canvas.width = Math.max(1, Math.round(width * ratio));
    this.canvas.height = Math.max(1, Math.round(height * ratio));
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.redraw();
  }

  draw(key, bitmap) {
    this.hideMessage();
    this.shown = { key, bitmap };
    if (key) this.drawn += 1;
    this.redraw();
    if (this.drawn === 1) this.loadThumbnails();
  }

  // The series thumbnails are asked for once the first image is up: they would compete
  // with it on the server.
  loadThumbnails() {
    for (const image of this.strip.querySelectorAll("img[data-src]")) {
      image.src = image.dataset.src;
      image.removeAttribute("data-src");
    }
  }

  redraw() {
    const context = this.canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = "#000";
    context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.shown) return;
    const { bitmap } = this.shown;
    const slice = this.stack[this.index];
    const ratio = window.devicePixelRatio || 1;
    const sourceWidth = slice ? slice.columns || bitmap.width : bitmap.width; // zoom is per DICOM pixel
    const aspect = this.pixelAspect(slice); // a pixel's height ÷ its width
    if (this.fit) {
      const { width, height } = this.stage.getBoundingClientRect();
      this.zoom = Math.min(width / sourceWidth, height / (bitmap.height * aspect * (sourceWidth / bitmap.width)));
    }
    const scale = (this.zoom * ratio * sourceWidth) / bitmap.width;
    const drawWidth = bitmap.width * scale;
    const drawHeight = bitmap.height * scale * aspect;
    const x = (this.canvas.width - drawWidth) / 2 + this.pan[0] * ratio;
    const y = (this.canvas.height - drawHeight) / 2 + this.pan[1] * ratio;
    context.imageSmoothingEnabled = scale < 2;
    context.filter = this.invert ? "invert(1)" : "none";
    context.drawImage(bitmap, x, y, drawWidth, drawHeight);
    context.filter = "none";
    this.updateOverlays();
  }

  // Pixel Spacing (row, column) or Pixel Aspect Ratio (vertical, horizontal): images keep
  // their true proportions when pixels are not square.
  pixelAspect(slice) {
    const meta = slice && this.metadata.get(slice.sop);
    const spacing = values(meta, "00280030").map(Number);
    if (spacing.length === 2 && spacing[0] > 0 && spacing[1] > 0) return spacing[0] / spacing[1];
    const ratio = values(meta, "00280034").map(Number);
    if (ratio.length === 2 && ratio[0] > 0 && ratio[1] > 0) return ratio[0] / ratio[1];
    return 1;
  }

  updateOverlays() {
    const meta = this.metadata.get(this.stack[this.index]?.sop);
    const [tl, tr, bl, br] = this.corners;
    for (const corner of this.corners) corner.hidden = !this.overlays;
    const slice = this.stack[this.index];
    if (!slice) return;
    const window = this.windowText(meta);
    if (meta) {
      const where = `${text(meta, "00100010")} · ${formatDate(first(meta, "00080020"))} · ${text(meta, "00081030")}`;
      document.getElementById("where").textContent = where;
      document.title = `${text(meta, "00100010")} — minipacs`;
    }
    tl.textContent = meta ? `${text(meta, "00100010")}\n${text(meta, "00100020")}\n${formatDate(first(meta, "00100030"))}` : "";
    tr.textContent = meta ? `${text(meta, "00081030")}\n${formatDate(first(meta, "00080020"))} ${text(meta, "00080030").slice(0, 6)}` : "";
    bl.textContent = `${meta ? text(meta, "0008103E") : ""}\nSe ${meta ? first(meta, "00200011") ?? "" : ""}  Im ${slice.number ?? ""}${slice.frames > 1 ? `  Fr ${slice.frame}/${slice.frames}` : ""}\n${this.index + 1} / ${this.stack.length}`;
    br.textContent = `${window}\nZoom ${Math.round(this.zoom * 100)}%${this.invert ? "\nInverted" : ""}`;
  }

  windowText(meta) {
    if (this.window === "auto") return "WC/WW auto";
    const window = this.window || this.fileWindow(meta);
    if (!window) return meta ? "WC/WW auto" : "WC/WW file";
    return `WC ${Math.round(window.center)} WW ${Math.round(window.width)}`;
  }

  fileWindow(meta) {
    const center = values(meta, "00281050")[0];
    const width = values(meta, "00281051")[0];
    return center !== undefined && width !== undefined ? { center: Number(center), width: Number(width) } : null;
  }

  // -- window/level ----------------------------------------------------------------------

  startDrag(event) {
    if (!this.stack.length) return;
    this.stage.focus();
    this.stage.setPointerCapture(event.pointerId);
    const start = [event.clientX, event.clientY];
    const pan = [...this.pan];
    const mode = event.button === 1 || event.shiftKey ? "pan" : event.button === 2 ? "zoom" : "window";
    const zoom = this.zoom;
    const window = this.startWindow();
    const move = (moved) => {
      const dx = moved.clientX - start[0];
      const dy = moved.clientY - start[1];
      if (mode === "pan") {
        this.pan = [pan[0] + dx, pan[1] + dy];
        this.redraw();
      } else if (mode === "zoom") {
        this.fit = false;
        this.zoom = Math.min(20, Math.max(0.05, zoom * Math.exp(-dy / 200)));
        this.redraw();
      } else if (Math.abs(dx) + Math.abs(dy) > 1) {
        const step = Math.max(1, window.width / 256);
        this.window = { center: window.center + dy * step, width: Math.max(1, window.width + dx * step) };
        this.preset = "custom";
        this.presetSelect.value = "custom";
        this.dragging = true;
        this.dragRender();
      }
    };
    const up = () => {
      this.stage.removeEventListener("pointermove", move);
      this.stage.removeEventListener("pointerup", up);
      this.stage.removeEventListener("pointercancel", up);
      if (this.dragging) {
        this.dragging = false;
        this.request(this.index, "png", { current: true });
        this.prefetch();
      }
    };
    this.stage.addEventListener("pointermove", move);
    this.stage.addEventListener("pointerup", up);
    this.stage.addEventListener("pointercancel", up);
  }

  startWindow() {
    if (this.window && this.window !== "auto") return this.window;
    const meta = this.metadata.get(this.stack[this.index].sop);
    const file = this.fileWindow(meta);
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
    this.updateOverlays();
    if (this.dragInFlight) {
      this.dragPending = true;
      return;
    }
    this.dragInFlight = true;
    this.dragPending = false;
    for (const [key, controller] of this.loading) {
      if (!key.endsWith("|jpeg")) {
        controller.abort();
        this.loading.delete(key);
      }
    }
    this.request(this.index, "jpeg", { current: true, quality: 70 })
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
      this.request(this.index, "png", { current: true });
      this.prefetch();
    }
  }

  // -- tools -----------------------------------------------------------------------------

  setFit() {
    this.fit = true;
    this.pan = [0, 0];
    this.redraw();
  }

  setZoom(zoom) {
    this.fit = false;
    this.zoom = Math.min(20, Math.max(0.05, zoom));
    this.redraw();
  }

  toggleInvert() {
    this.invert = !this.invert;
    this.invertButton.setAttribute("aria-pressed", String(this.invert));
    this.redraw();
  }

  toggleOverlays() {
    this.overlays = !this.overlays;
    this.overlayButton.setAttribute("aria-pressed", String(this.overlays));
    this.updateOverlays();
  }

  toggleTags() {
    this.tags.hidden = !this.tags.hidden;
    this.tagButton.setAttribute("aria-pressed", String(!this.tags.hidden));
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

  // -- metadata and tags -----------------------------------------------------------------

  async loadMetadata(sop) {
    if (this.metadata.has(sop)) {
      this.updateOverlays();
      this.renderTags();
      return;
    }
    clearTimeout(this.metadataTimer);
    this.metadataTimer = setTimeout(async () => {
      try {
        const meta = await instanceMetadata(this.study, this.series, sop, this.controller.signal);
        this.metadata.set(sop, meta);
        if (this.stack[this.index]?.sop === sop) {
          this.redraw(); // its pixel aspect, and the overlays
          this.renderTags();
        }
      } catch (error) {
        if (error.name !== "AbortError") this.showMessage(`Cannot read the instance's tags: ${error.message}`);
      }
    }, this.cine ? 250 : 30);
  }

  async renderTags() {
    if (this.tags.hidden) return;
    const sop = this.stack[this.index]?.sop;
    const meta = this.metadata.get(sop);
    if (!meta) {
      this.tags.replaceChildren(el("p", { class: "state" }, "Loading tags…"));
      return;
    }
    const names = await keywords();
    const rows = [];
    addTagRows(rows, meta, names, 0);
    this.tags.replaceChildren(
      el("h2", {}, "Tags"),
      el("table", { class: "tag-table" }, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Tag"), el("th", { scope: "col" }, "Name"), el("th", { scope: "col" }, "VR"), el("th", { scope: "col" }, "Value"))), el("tbody", {}, ...rows)),
    );
  }

  // -- messages and closing --------------------------------------------------------------

  fail(error) {
    if (error.name === "AbortError") return;
    this.showMessage(error.status === 404 ? "This study is not in the archive." : `Server error: ${error.message}`);
  }

  showMessage(message) {
    this.message.textContent = message;
    this.message.hidden = false;
  }

  hideMessage() {
    this.message.hidden = true;
  }

  close() {
    this.stopCine();
    this.controller.abort();
    for (const controller of this.loading.values()) controller.abort();
    this.resize.disconnect();
    for (const bitmap of this.bitmaps.values()) bitmap.close();
    globalThis.minipacsView = null;
  }
}

let keywordTable = null;
function keywords() {
  keywordTable ??= fetch("/ui/keywords.json").then((r) => (r.ok ? r.json() : {}), () => ({}));
  return keywordTable;
}

function addTagRows(rows, dataset, names, depth) {
  for (const tag of Object.keys(dataset).sort()) {
    const element = dataset[tag];
    const label = `(${tag.slice(0, 4)},${tag.slice(4)})`;
    let value;
    if (element.vr === "SQ") value = `${(element.Value || []).length} item(s)`;
    else if (element.BulkDataURI) value = "(bulk data)";
    else if (element.InlineBinary) value = "(binary)";
    else value = text(dataset, tag);
    const row = el("tr", { "data-tag": tag }, el("td", { class: "tag" }, "  ".repeat(depth) + label), el("td", {}, names[tag] || ""), el("td", {}, element.vr || ""), el("td", { class: "value" }, value.length > 200 ? value.slice(0, 200) + "…" : value));
    rows.push(row);
    if (element.vr === "SQ" && depth < 3) {
      for (const item of element.Value || []) addTagRows(rows, item, names, depth + 1);
    }
  }
}
