// The viewport: a canvas showing one rendered frame, fitted or zoomed, panned, rotated
// by quarter turns, flipped and inverted, with the overlays: the four corners (patient,
// study, series/instance/frame and slice, window and zoom), the orientation letters on
// the edges, a scale bar, a key image mark, an SVG layer on which other modules draw in image coordinates
// (measurements, reference lines), and a message line for what cannot be shown.
//
// One matrix maps image coordinates (pixels from the image's top-left corner) to the
// stage's CSS pixels; the canvas, the SVG layer and pointer input all go through it, so
// what is drawn on the image moves with zoom, pan, rotation and flips.

import { first, formatDate, text } from "./dicomweb.js";
import { el } from "./dom.js";
import { edgeLetters, pixelAspect, unitOf } from "./orientation.js";

const ZOOM = [0.05, 20]; // smallest and largest zoom (screen pixels a DICOM pixel)
const SVG = "http://www.w3.org/2000/svg";
const BAR = 0.2; // the scale bar's longest share of the viewport's width
const PIXELS = { row: 1, column: 1, kind: "px" }; // no spacing known (yet)

export class Viewport {
  // `describe()` says what is current: { slice, meta, position, total, window, geometry,
  // keyImage } (meta undefined until the instance's metadata is in; window the overlay's
  // WC/WW text; geometry orientation.js's, null until known; a slice's `label`, when it
  // has one, replaces the series and instance numbers).
  constructor(describe) {
    this.describe = describe;
    this.canvas = el("canvas", { class: "image", role: "img", "aria-label": "Image" });
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("class", "marks");
    this.message = el("p", { class: "message", role: "alert", hidden: "" });
    this.corners = ["tl", "tr", "bl", "br"].map((c) => el("div", { class: `corner ${c}` }));
    this.letters = Object.fromEntries(
      ["top", "right", "bottom", "left"].map((edge) => [edge, el("div", { class: `orient ${edge}`, "aria-label": `${edge} edge` })]),
    );
    this.bar = el("div", { class: "scalebar-line" });
    this.barLabel = el("span", { class: "scalebar-label" });
    this.scalebar = el("div", { class: "scalebar", "aria-label": "Scale" }, this.bar, this.barLabel);
    this.keyMark = el("div", { class: "key-mark", hidden: "" }, "★ Key image");
    this.stage = el(
      "div",
      { class: "stage", tabindex: "0", "aria-label": "Viewport: wheel or arrows scroll, drag sets the window" },
      this.canvas,
      this.svg,
      ...this.corners,
      ...Object.values(this.letters),
      this.scalebar,
      this.keyMark,
      this.message,
    );
    this.zoom = 1;
    this.fit = true;
    this.pan = [0, 0];
    this.orient = [1, 0, 0, 1]; // image directions → screen directions (orientation.js)
    this.invert = false;
    this.overlays = true;
    this.shown = null; // { key, bitmap }: key null while a stand-in is shown
    this.layers = []; // { render(viewport) }: drawn on the SVG layer after each redraw
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

  // The image's size in its own pixels (the bitmap may have been rendered smaller).
  imageSize() {
    const { slice } = this.describe();
    const bitmap = this.shown && this.shown.bitmap;
    return {
      columns: (slice && slice.columns) || (bitmap ? bitmap.width : 1),
      rows: (slice && slice.rows) || (bitmap ? bitmap.height : 1),
    };
  }

  // Image coordinates → the stage's CSS pixels.
  matrix() {
    const { meta, geometry } = this.describe();
    const { columns, rows } = this.imageSize();
    const aspect = pixelAspect(meta, geometry ? geometry.spacing : PIXELS);
    const [a, b, c, d] = this.orient;
    const linear = (zoom) => [zoom * a, zoom * c, zoom * aspect * b, zoom * aspect * d]; // DOMMatrix a, b, c, d
    const { width, height } = this.stage.getBoundingClientRect();
    if (this.fit) {
      const [ma, mb, mc, md] = linear(1);
      const extent = [Math.abs(ma) * columns + Math.abs(mc) * rows, Math.abs(mb) * columns + Math.abs(md) * rows];
      this.zoom = Math.min(width / extent[0], height / extent[1]);
    }
    const [ma, mb, mc, md] = linear(this.zoom);
    const e = width / 2 + this.pan[0] - (ma * columns + mc * rows) / 2;
    const f = height / 2 + this.pan[1] - (mb * columns + md * rows) / 2;
    return new DOMMatrix([ma, mb, mc, md, e, f]);
  }

  // A pointer event's position in image coordinates.
  toImage(event) {
    const box = this.stage.getBoundingClientRect();
    const point = this.matrix().inverse().transformPoint(new DOMPoint(event.clientX - box.left, event.clientY - box.top));
    return [point.x, point.y];
  }

  // An image point in the stage's CSS pixels.
  toScreen([x, y]) {
    const point = this.matrix().transformPoint(new DOMPoint(x, y));
    return [point.x, point.y];
  }

  redraw() {
    const context = this.canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = "#000";
    context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.shown) {
      this.updateOverlays();
      this.renderLayers();
      return;
    }
    const { bitmap } = this.shown;
    const ratio = window.devicePixelRatio || 1;
    const { columns, rows } = this.imageSize();
    const m = this.matrix();
    context.setTransform(m.a * ratio, m.b * ratio, m.c * ratio, m.d * ratio, m.e * ratio, m.f * ratio);
    context.imageSmoothingEnabled = (this.zoom * ratio * columns) / bitmap.width < 2;
    context.filter = this.invert ? "invert(1)" : "none";
    context.drawImage(bitmap, 0, 0, columns, rows);
    context.filter = "none";
    context.setTransform(1, 0, 0, 1, 0, 0);
    this.updateOverlays();
    this.renderLayers();
  }

  renderLayers() {
    const { width, height } = this.stage.getBoundingClientRect();
    this.svg.setAttribute("viewBox", `0 0 ${Math.max(1, width)} ${Math.max(1, height)}`);
    for (const layer of this.layers) layer.render(this);
  }

  updateOverlays() {
    const { slice, meta, position, total, window, geometry, keyImage } = this.describe();
    const [tl, tr, bl, br] = this.corners;
    const hidden = !this.overlays || !slice;
    for (const node of [...this.corners, ...Object.values(this.letters), this.scalebar]) node.hidden = hidden;
    this.keyMark.hidden = hidden || !keyImage;
    if (!slice) return;
    tl.textContent = meta ? `${text(meta, "00100010")}\n${text(meta, "00100020")}\n${formatDate(first(meta, "00100030"))}` : "";
    tr.textContent = meta ? `${text(meta, "00081030")}\n${formatDate(first(meta, "00080020"))} ${text(meta, "00080030").slice(0, 6)}` : "";
    bl.textContent = [
      meta ? text(meta, "0008103E") : "",
      slice.label ?? `Se ${meta ? first(meta, "00200011") ?? "" : ""}  Im ${slice.number ?? ""}${slice.frames > 1 ? `  Fr ${slice.frame}/${slice.frames}` : ""}`,
      sliceText(geometry),
      `${position} / ${total}`,
    ]
      .filter((line, i) => line || i !== 2)
      .join("\n");
    br.textContent = `${window}\nZoom ${Math.round(this.zoom * 100)}%${this.invert ? "\nInverted" : ""}`;
    const letters = edgeLetters(geometry && geometry.plane, this.orient);
    for (const [edge, node] of Object.entries(this.letters)) {
      node.textContent = letters ? letters[edge] : "";
      node.hidden = hidden || !letters;
    }
    this.updateScalebar(geometry ? geometry.spacing : PIXELS);
  }

  // A bar of a round length (1, 2 or 5 × 10^n) no longer than a fifth of the width.
  updateScalebar(spacing) {
    const perUnit = this.zoom / spacing.column; // CSS pixels a mm (or a pixel, with "px")
    const { width } = this.stage.getBoundingClientRect();
    const longest = (width * BAR) / perUnit;
    if (!(longest > 0) || !Number.isFinite(longest)) {
      this.scalebar.hidden = true;
      return;
    }
    const power = 10 ** Math.floor(Math.log10(longest));
    const length = [5, 2, 1].map((m) => m * power).find((l) => l <= longest);
    this.bar.style.width = `${length * perUnit}px`;
    this.barLabel.textContent = `${length} ${unitOf(spacing)}`;
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

  // A quarter turn clockwise (1) or anticlockwise (-1) of what is on screen.
  rotate(direction) {
    const [a, b, c, d] = this.orient;
    this.orient = direction > 0 ? [-c, -d, a, b] : [c, d, -a, -b];
    this.pan = [-direction * this.pan[1], direction * this.pan[0]];
    this.redraw();
  }

  // Mirror what is on screen left–right ("h") or top–bottom ("v").
  flip(axis) {
    const [a, b, c, d] = this.orient;
    this.orient = axis === "h" ? [-a, -b, c, d] : [a, b, -c, -d];
    this.pan = axis === "h" ? [-this.pan[0], this.pan[1]] : [this.pan[0], -this.pan[1]];
    this.redraw();
  }

  // Back to the fitted, upright, unflipped, uninverted picture.
  reset() {
    this.orient = [1, 0, 0, 1];
    this.invert = false;
    this.setFit();
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
    this.canvas.width = this.canvas.height = 0; // its memory, now
  }
}

// Slice location and thickness, when known.
function sliceText(geometry) {
  if (!geometry) return "";
  const parts = [];
  if (geometry.location !== null) parts.push(`Loc ${round(geometry.location)} mm`);
  if (geometry.thickness !== null) parts.push(`Th ${round(geometry.thickness)} mm`);
  return parts.join("  ");
}

function round(value) {
  return Math.round(value * 100) / 100;
}
