// A pane of the layout: one series in one viewport, with its own slice, window, zoom,
// orientation, cine and scroll bar. It loads its stack (QIDO-RS instances) and asks the
// stack loader (stackloader.js) for frames; its wheel, drags and window keys are
// paneinput.js's, which turns them into slices, windows, pan and zoom. What spans panes (which one is active, syncing,
// reference lines, the toolbar, the URL) belongs to the study view, told through
// `host`: `activate(pane)`, `moved(pane)`, `loaded(pane)`, `draw(key, bitmap)` (the
// active pane's frames go through it: the debug API's one draw call), `metadata` (sop →
// instance metadata, shared), `metadataAsked` (sop → its request while it is out,
// shared), `signal`, `drag(pane, event)` (a tool's own drag, or null to let the pane
// handle it), `isKeyImage(sop)` (for the overlay).

import { first, instanceMetadata, searchInstances, seriesGeometry, seriesMetadata, text, values } from "./dicomweb.js";
import { el } from "./dom.js";
import { geometryFromApi, geometryOf } from "./orientation.js";
import { PaneInput } from "./paneinput.js";
import { StackLoader } from "./stackloader.js";
import { Viewport } from "./viewport.js";

export class Pane {
  constructor(host, number) {
    this.host = host;
    this.number = number;
    this.study = "";
    this.series = "";
    this.seriesEntry = null; // the series' QIDO-RS answer
    this.stack = []; // { sop, frame, frames, number, rows, columns }
    this.index = 0;
    this.direction = 1;
    this.window = null; // null: the file's own; "auto"; or { center, width }
    this.preset = "file";
    this.dragging = false; // the window is being dragged (or keyed): JPEGs until it ends
    this.drawn = 0; // exact frames drawn in this pane
    this.cine = null;
    this.fps = 10;
    this.metadata = host.metadata;
    this.viewport = new Viewport(() => this.describe());
    this.loader = new StackLoader(this);
    this.counter = el("output", { class: "counter", "aria-live": "off" });
    this.slider = el("input", { type: "range", min: "1", max: "1", value: "1", "aria-label": `Image in series (viewport ${number})` });
    this.slider.addEventListener("input", () => this.go(Number(this.slider.value) - 1));
    this.node = el(
      "section",
      { class: "pane", "data-pane": String(number), "aria-label": `Viewport ${number}` },
      this.viewport.stage,
      el("div", { class: "scroll" }, this.slider, this.counter),
    );
    this.input = new PaneInput(this); // the wheel, drags and window keys
  }

  get modality() {
    return text(this.seriesEntry, "00080060");
  }

  // -- loading a series --------------------------------------------------------------------

  // Show series `entry` (a QIDO-RS series answer) of `study`; resolves once its stack is
  // known (empty when it could not be read: the viewport says why). `sop` and `frame`:
  // the slice that will be shown first, when it is not the first one.
  async open(study, entry, { sop = "", frame = 1 } = {}) {
    this.stopCine();
    this.study = study;
    this.seriesEntry = entry;
    this.series = first(entry, "0020000E");
    this.stack = [];
    this.index = 0;
    this.seriesGeometry = null; // sop → where the instance lies (orientation.js)
    this.volume = null; // the server's word on whether the series is a volume (for MPR)
    this.geometryAsked = false;
    const series = this.series;
    this.warmFirst(study, series, sop, frame);
    const listed = searchInstances(study, series, this.host.signal); // before a redraw's layout
    this.viewport.shown = null;
    this.viewport.redraw();
    let instances;
    try {
      instances = await listed;
    } catch (error) {
      if (error.name !== "AbortError") this.viewport.showMessage(`Server error: ${error.message}`);
      return;
    }
    if (series !== this.series) return;
    instances.sort((a, b) => (first(a, "00200013") ?? 1e9) - (first(b, "00200013") ?? 1e9));
    this.stack = instances.flatMap(slicesOf);
    this.slider.max = String(Math.max(1, this.stack.length));
    if (!this.stack.length) this.viewport.showMessage("This series has no images.");
    this.host.loaded(this);
  }

  // The whole instance list is what a 500-image series' first image waited longest for.
  // The slice shown first is known much sooner: the one asked for, else the series' first
  // stored instance (QIDO-RS answers in the order stored), the first slice of a series
  // stored in order, as most are. Its image is fetched beside the list; when the list
  // says it is not the one shown, the stack loader drops it.
  async warmFirst(study, series, sop, frame) {
    let found;
    try {
      [found] = await searchInstances(study, series, this.host.signal, sop ? { SOPInstanceUID: sop } : { limit: 1 });
    } catch {
      return; // the list decides
    }
    const slice = found && slicesOf(found)[frame - 1];
    if (slice && series === this.series && !this.stack.length) this.loader.warm(slice);
  }

  // -- moving through the stack ----------------------------------------------------------

  // Show slice `index`. `synced`: moved by another pane (no syncing back).
  go(index, { fromUrl = false, synced = false } = {}) {
    if (!this.stack.length) return;
    const next = Math.min(this.stack.length - 1, Math.max(0, index));
    if (next !== this.index) this.direction = next > this.index ? 1 : -1;
    this.index = next;
    this.slider.value = String(next + 1);
    this.counter.value = `${next + 1} / ${this.stack.length}`;
    this.counter.textContent = this.counter.value;
    this.loader.showCurrent();
    this.loader.prefetch();
    this.loadMetadata(this.stack[next].sop);
    this.host.moved(this, { fromUrl, synced });
  }

  // The page URL of what this pane shows.
  url() {
    const slice = this.stack[this.index];
    if (!slice) return `/study/${this.study}/series/${this.series}`;
    const frame = slice.frames > 1 ? `?frame=${slice.frame}` : "";
    return `/study/${this.study}/series/${this.series}/instance/${slice.sop}${frame}`;
  }

  // The stack loader's way to the canvas (key null: a stand-in until the exact one).
  draw(key, bitmap) {
    if (this.host.active === this) this.host.draw(key, bitmap);
    else this.paint(key, bitmap);
  }

  paint(key, bitmap) {
    if (key) this.drawn += 1;
    this.viewport.show(key, bitmap);
    if (key && !this.geometryAsked) {
      this.geometryAsked = true; // after the first image, which it must not delay
      this.loadGeometry();
    }
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

  // -- geometry ------------------------------------------------------------------------------

  // Where slice `index` lies (orientation.js's geometry, plus its size), from the
  // series geometry once it is in, else from the instance's metadata; null while
  // neither is.
  geometry(index = this.index) {
    const slice = this.stack[index];
    if (!slice) return null;
    const meta = this.metadata.get(slice.sop);
    let found = slice.frames === 1 && this.seriesGeometry ? this.seriesGeometry.get(slice.sop) : null;
    if (!found && meta) found = geometryOf(meta, slice.frame);
    return found ? { ...found, columns: slice.columns, rows: slice.rows } : null;
  }

  // The geometry of every instance (sop → orientation.js's geometry), which syncing and
  // reference lines need: the server's series geometry (docs/viewer-api.md, 1), else
  // the series' WADO-RS metadata. Asked for once the first image is drawn, so as not
  // to hold it up.
  async loadGeometry() {
    const { study, series } = this;
    const signal = this.host.signal;
    let found;
    try {
      const answer = await seriesGeometry(study, series, signal);
      found = answer.instances.map((item) => [item.sopInstanceUID, geometryFromApi(item)]);
      if (series === this.series) this.volume = answer.volume;
    } catch (error) {
      if (error.name === "AbortError") return;
      try {
        const metadata = await seriesMetadata(study, series, signal);
        found = metadata.map((meta) => [first(meta, "00080018"), geometryOf(meta)]);
      } catch {
        return; // each instance's own metadata stands in
      }
    }
    if (series !== this.series) return;
    this.seriesGeometry = new Map(found);
    this.viewport.redraw();
    this.host.geometryLoaded(this);
  }

  // The metadata of the instance shown (undefined until it is in).
  currentMeta() {
    const slice = this.stack[this.index];
    return slice && this.metadata.get(slice.sop);
  }

  // What the viewport shows now, for its drawing and overlays.
  describe() {
    const slice = this.stack[this.index];
    const meta = this.currentMeta();
    return {
      slice,
      meta,
      position: this.index + 1,
      total: this.stack.length,
      window: this.windowText(meta),
      geometry: this.geometry(),
      keyImage: Boolean(slice) && this.host.isKeyImage(slice.sop),
    };
  }

  windowText(meta) {
    if (this.window === "auto") return "WC/WW auto";
    const window = this.window || fileWindow(meta);
    if (!window) return meta ? "WC/WW auto" : "WC/WW file";
    return `WC ${Math.round(window.center)} WW ${Math.round(window.width)}`;
  }

  // -- the window ---------------------------------------------------------------------------

  // A press on the stage: a tool's, or a drag (paneinput.js). MPR's planes add their
  // crosshair click.
  startDrag(event) {
    this.input.drag(event);
  }

  // The window a drag or a window key starts from: the pane's, else the file's, else the
  // whole range of the stored values.
  startWindow() {
    if (this.window && this.window !== "auto") return this.window;
    const meta = this.currentMeta();
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

  // "file", "auto", "center,width" or "custom" (the window as it is).
  applyPreset(value) {
    this.preset = value;
    if (value === "file") this.window = null;
    else if (value === "auto") this.window = "auto";
    else if (value !== "custom") {
      const [center, width] = value.split(",").map(Number);
      this.window = { center, width };
    }
    this.viewport.updateOverlays();
    if (this.stack.length) {
      this.loader.request(this.index, "png", { current: true });
      this.loader.prefetch();
    }
  }

  // Back to the file's window and the fitted, upright, uninverted picture.
  reset() {
    this.viewport.reset();
    if (this.preset !== "file") this.applyPreset("file");
  }

  // -- cine ----------------------------------------------------------------------------------

  toggleCine() {
    if (this.cine) this.stopCine();
    else this.startCine();
    return Boolean(this.cine);
  }

  startCine() {
    clearInterval(this.cine);
    this.cine = setInterval(() => this.go(this.index + 1 < this.stack.length ? this.index + 1 : 0), 1000 / this.fps);
  }

  stopCine() {
    clearInterval(this.cine);
    this.cine = null;
  }

  // -- metadata ----------------------------------------------------------------------------

  // The current instance's metadata, for the overlays, the geometry and the tag panel.
  // Asked for after a short pause (longer during cine), so scrolling past an instance
  // does not fetch it.
  loadMetadata(sop) {
    if (this.metadata.has(sop)) {
      this.viewport.updateOverlays();
      this.host.metadataShown(this);
      return;
    }
    clearTimeout(this.metadataTimer);
    this.metadataTimer = setTimeout(async () => {
      try {
        await this.metadataOf(sop);
        if (this.stack[this.index]?.sop === sop) {
          this.viewport.redraw(); // its pixel aspect, the overlays and the geometry
          this.host.metadataShown(this);
        }
      } catch (error) {
        if (error.name !== "AbortError") this.viewport.showMessage(`Cannot read the instance's tags: ${error.message}`);
      }
    }, this.cine ? 250 : 30);
  }

  // Instance `sop`'s metadata (of this pane's series): the panes' shared map's, else
  // asked for and kept there. Asked for once: a caller while the request is out (MPR's
  // header and the pause after a move, or two panes) waits for the same one.
  metadataOf(sop) {
    if (this.metadata.has(sop)) return Promise.resolve(this.metadata.get(sop));
    const asked = this.host.metadataAsked;
    if (!asked.has(sop)) {
      const request = instanceMetadata(this.study, this.series, sop, this.host.signal).then((meta) => {
        this.metadata.set(sop, meta);
        return meta;
      });
      asked.set(sop, request);
      request.then(
        () => asked.delete(sop),
        () => asked.delete(sop), // a failed one is asked for again next time
      );
    }
    return asked.get(sop);
  }

  close() {
    this.input.close();
    this.stopCine();
    clearTimeout(this.metadataTimer);
    this.loader.close();
    this.viewport.close();
  }
}

// The stack's slices of a QIDO-RS instance answer: one a frame.
function slicesOf(instance) {
  const frames = Number(first(instance, "00280008") || 1);
  return Array.from({ length: frames }, (_, i) => ({
    sop: first(instance, "00080018"),
    frame: i + 1,
    frames,
    number: first(instance, "00200013"),
    rows: Number(first(instance, "00280010") || 0),
    columns: Number(first(instance, "00280011") || 0),
  }));
}

export function fileWindow(meta) {
  const center = values(meta, "00281050")[0];
  const width = values(meta, "00281051")[0];
  return center !== undefined && width !== undefined ? { center: Number(center), width: Number(width) } : null;
}
