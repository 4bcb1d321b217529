// The viewport: a canvas showing one rendered frame, fitted or zoomed, panned, inverted,
// with the overlay corners (patient, study, series/instance/frame, window, zoom) and a
// message line for what cannot be shown.

import { first, formatDate, text, values } from "./dicomweb.js";
import { el } from "./dom.js";

const ZOOM = [0.05, 20]; // smallest and largest zoom (screen pixels a DICOM pixel)

export class Viewport {
  // `describe()` says what is current: { slice, meta, position, total, window } (meta
  // undefined until the instance's metadata is in; window the overlay's WC/WW text).
  constructor(describe) {
    this.describe = describe;
    this.canvas = el("canvas", { class: "image", role: "img", "aria-label": "Image" });
    this.message = el("p", { class: "message", role: "alert", hidden: "" });
    this.corners = ["tl", "tr", "bl", "br"].map((c) => el("div", { class: `corner ${c}` }));
    this.stage = el("div", { class: "stage", tabindex: "0", "aria-label": "Viewport: wheel or arrows scroll, drag sets the window" }, this.canvas, ...this.corners, this.message);
    this.zoom = 1;
    this.fit = true;
    this.pan = [0, 0];
    this.invert = false;
    this.overlays = true;
    this.shown = null; // { key, bitmap }: key null while a stand-in is shown
    this.resize = new ResizeObserver(() => this.fitCanvas());
    this.resize.observe(this.stage);
  }

  show(key, bitmap) {
    this.hideMessage();
    this.shown = { key, bitmap };
    this.redraw();
  }

  fitCanvas() {
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = this.stage.getBoundingClientRect();
    this.canvas.width = Math.max(1, Math.round(width * ratio));
    this.canvas.height = Math.max(1, Math.round(height * ratio));
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.redraw();
  }

  redraw() {
    const context = this.canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = "#000";
    context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.shown) return;
    const { bitmap } = this.shown;
    const { slice, meta } = this.describe();
    const ratio = window.devicePixelRatio || 1;
    const sourceWidth = slice ? slice.columns || bitmap.width : bitmap.width; // zoom is per DICOM pixel
    const aspect = pixelAspect(meta); // a pixel's height ÷ its width
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

  updateOverlays() {
    const { slice, meta, position, total, window } = this.describe();
    const [tl, tr, bl, br] = this.corners;
    for (const corner of this.corners) corner.hidden = !this.overlays;
    if (!slice) return;
    if (meta) {
      const where = `${text(meta, "00100010")} · ${formatDate(first(meta, "00080020"))} · ${text(meta, "00081030")}`;
      document.getElementById("where").textContent = where;
      document.title = `${text(meta, "00100010")} — minipacs`;
    }
    tl.textContent = meta ? `${text(meta, "00100010")}\n${text(meta, "00100020")}\n${formatDate(first(meta, "00100030"))}` : "";
    tr.textContent = meta ? `${text(meta, "00081030")}\n${formatDate(first(meta, "00080020"))} ${text(meta, "00080030").slice(0, 6)}` : "";
    bl.textContent = `${meta ? text(meta, "0008103E") : ""}\nSe ${meta ? first(meta, "00200011") ?? "" : ""}  Im ${slice.number ?? ""}${slice.frames > 1 ? `  Fr ${slice.frame}/${slice.frames}` : ""}\n${position} / ${total}`;
    br.textContent = `${window}\nZoom ${Math.round(this.zoom * 100)}%${this.invert ? "\nInverted" : ""}`;
  }

  setFit() {
    this.fit = true;
    this.pan = [0, 0];
    this.redraw();
  }

  setZoom(zoom) {
    this.fit = false;
    this.zoom = Math.min(ZOOM[1], Math.max(ZOOM[0], zoom));
    this.redraw();
  }

  panTo(pan) {
    this.pan = pan;
    this.redraw();
  }

  toggleInvert() {
    this.invert = !this.invert;
    this.redraw();
    return this.invert;
  }

  toggleOverlays() {
    this.overlays = !this.overlays;
    this.updateOverlays();
    return this.overlays;
  }

  showMessage(message) {
    this.message.textContent = message;
    this.message.hidden = false;
  }

  hideMessage() {
    this.message.hidden = true;
  }

  close() {
    this.resize.disconnect();
  }
}

// Pixel Spacing (row, column) or Pixel Aspect Ratio (vertical, horizontal): images keep
// their true proportions when pixels are not square.
function pixelAspect(meta) {
  const spacing = values(meta, "00280030").map(Number);
  if (spacing.length === 2 && spacing[0] > 0 && spacing[1] > 0) return spacing[0] / spacing[1];
  const ratio = values(meta, "00280034").map(Number);
  if (ratio.length === 2 && ratio[0] > 0 && ratio[1] > 0) return ratio[0] / ratio[1];
  return 1;
}
