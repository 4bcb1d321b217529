// Measurements on the image: length, angle, and elliptical or rectangular ROIs. Their
// points are image pixel coordinates (docs/viewer-api.md), so they move with zoom, pan,
// turns and flips; they are kept per image (instance and frame) while the study view is
// open, so scrolling away and back finds them; a handle dragged edits one, Delete
// removes the selected one. Points are placed with the pointer, or with the keyboard
// cursor (cursor.js) and Enter; without a pointer a point is edited by grabbing it (the
// next one on the image each time), moving the cursor and Enter. Lengths and angles are
// computed here from the pixel spacing (mm, mm at the detector, or px without spacing);
// ROI statistics come from the server, in modality units from the stored pixels, never
// the windowed picture.

import { roiStatistics } from "./dicomweb.js";
import { unitOf } from "./orientation.js";

export const TOOLS = ["length", "angle", "ellipse", "rectangle"];
const SVG = "http://www.w3.org/2000/svg";
const GRAB = 8; // CSS pixels from a handle that still grab it
const CLICK = 3; // CSS pixels: a shorter drag with a tool draws nothing

export class Measurements {
  // `changed()`: a measurement was added, moved, removed or got its statistics.
  constructor(changed) {
    this.changed = changed;
    this.byImage = new Map(); // "sop|frame" → [measurement]
    this.tool = "window"; // or one of TOOLS
    this.selected = null;
    this.placing = null; // { pane, measurement }: an angle waiting for its third point
    this.keyed = null; // a measurement being placed with the keyboard
    this.grabbed = null; // { measurement, handle, from }: a point the keyboard cursor moves
  }

  // The measurements on the image `pane` shows.
  on(pane) {
    const slice = pane.stack[pane.index];
    return (slice && this.byImage.get(`${slice.sop}|${slice.frame}`)) || [];
  }

  all() {
    return [...this.byImage.values()].flat();
  }

  add(measurement) {
    const key = `${measurement.sop}|${measurement.frame}`;
    if (!this.byImage.has(key)) this.byImage.set(key, []);
    this.byImage.get(key).push(measurement);
  }

  // Remove the selected measurement, else the newest on `pane`'s image.
  remove(pane) {
    const target = this.selected || this.on(pane).at(-1);
    if (!target) return;
    const key = `${target.sop}|${target.frame}`;
    const left = this.byImage.get(key).filter((m) => m !== target);
    if (left.length) this.byImage.set(key, left);
    else this.byImage.delete(key);
    if (target.request) target.request.abort();
    if (this.grabbed && this.grabbed.measurement === target) this.grabbed = null;
    this.selected = null;
    this.changed();
  }

  // Stop placing an angle or a keyboard measurement (it is dropped), put a grabbed point
  // back, and forget the selection.
  escape() {
    if (this.grabbed) {
      const { measurement, handle, from } = this.grabbed;
      measurement.points[handle] = from;
      this.grabbed = null;
    }
    if (this.placing) {
      this.selected = this.placing.measurement;
      this.placing = null;
      this.remove();
    }
    if (this.keyed) this.drop(this.keyed);
    this.selected = null;
    this.changed();
  }

  drop(measurement) {
    if (this.keyed === measurement) this.keyed = null;
    this.selected = measurement;
    this.remove();
  }

  // A point placed with the keyboard (Enter at the cursor, image point `point` of
  // `pane`): it starts a measurement of the tool, or fixes the point being placed;
  // the next point then follows the cursor (`follow`). One that ends where it began is
  // dropped, as a click is. False when no measurement tool is chosen.
  place(pane, point) {
    const slice = pane.stack[pane.index];
    if (!slice || this.tool === "window") return false;
    let measurement = this.keyed;
    if (measurement && (measurement.sop !== slice.sop || measurement.frame !== slice.frame || measurement.type !== this.tool)) {
      this.drop(measurement); // left unfinished on another image, or with another tool
      measurement = null;
    }
    if (!measurement) {
      measurement = { type: this.tool, study: pane.study, series: pane.series, sop: slice.sop, frame: slice.frame, points: [[...point], [...point]], stats: null };
      this.add(measurement);
      this.selected = measurement;
      this.keyed = measurement;
      this.changed();
      return true;
    }
    const points = measurement.points;
    points[points.length - 1] = [...point];
    if (measurement.type === "angle" && points.length < 3) points.push([...point]);
    else if (distance(points[0], points.at(-1)) === 0) this.drop(measurement);
    else {
      this.keyed = null;
      this.measured(measurement);
    }
    this.changed();
    return true;
  }

  // The keyboard cursor moved to `point` on `pane`: the point grabbed, or being placed,
  // follows.
  follow(pane, point) {
    const moving = this.grabbed || (this.keyed && { measurement: this.keyed, handle: this.keyed.points.length - 1 });
    const slice = pane.stack[pane.index];
    if (!moving || !slice || moving.measurement.sop !== slice.sop || moving.measurement.frame !== slice.frame) return;
    moving.measurement.points[moving.handle] = [...point];
    this.changed();
  }

  // The keyboard's handle: grab the next (`step` 1) or previous (-1) point of the
  // measurements on `pane`'s image, in the order they were drawn, each measurement's
  // points in turn (a point grabbed before stays where it was moved). It is selected
  // (Delete removes it) and follows the keyboard cursor until released. Returns the
  // point, or null when the image has none.
  grab(pane, step) {
    const handles = this.on(pane).flatMap((measurement) => measurement.points.map((_, handle) => ({ measurement, handle })));
    if (!handles.length) return null;
    const was = this.grabbed;
    const at = was ? handles.findIndex((h) => h.measurement === was.measurement && h.handle === was.handle) : -1;
    this.release();
    const next = handles[at < 0 ? (step > 0 ? 0 : handles.length - 1) : (at + step + handles.length) % handles.length];
    const point = next.measurement.points[next.handle];
    this.grabbed = { ...next, from: [...point] };
    this.selected = next.measurement;
    this.changed();
    return point;
  }

  // Leave the grabbed point where it is: an ROI moved gets its statistics again, as
  // after a drag. False when none was grabbed.
  release() {
    const grabbed = this.grabbed;
    if (!grabbed) return false;
    this.grabbed = null;
    if (distance(grabbed.measurement.points[grabbed.handle], grabbed.from) > 0) this.measured(grabbed.measurement);
    this.changed();
    return true;
  }

  // A primary-button press on `pane`: true when a measurement takes it (placing an
  // angle's third point, grabbing a handle, or drawing with a tool).
  press(pane, event) {
    const slice = pane.stack[pane.index];
    if (!slice || !pane.viewport.shown) return false;
    const viewport = pane.viewport;
    const point = viewport.toImage(event);
    this.release();
    if (this.placing) {
      const { measurement } = this.placing;
      this.placing = null;
      if (measurement.sop === slice.sop && measurement.frame === slice.frame) {
        measurement.points[2] = point;
        this.changed();
        return true;
      }
      this.selected = measurement;
      this.remove();
    }
    const box = viewport.stage.getBoundingClientRect();
    const at = [event.clientX - box.left, event.clientY - box.top];
    for (const measurement of [...this.on(pane)].reverse()) {
      const handle = measurement.points.findIndex((p) => distance(viewport.toScreen(p), at) <= GRAB);
      if (handle >= 0) {
        this.selected = measurement;
        this.drag(pane, event, measurement, handle);
        return true;
      }
    }
    if (this.tool === "window") {
      if (this.selected) {
        this.selected = null;
        this.changed();
      }
      return false;
    }
    const measurement = {
      type: this.tool,
      study: pane.study,
      series: pane.series,
      sop: slice.sop,
      frame: slice.frame,
      points: [point, [...point]],
      stats: null,
    };
    this.add(measurement);
    this.selected = measurement;
    this.drag(pane, event, measurement, 1, { drawing: true });
    return true;
  }

  // Move point `handle` with the pointer until it is released.
  drag(pane, event, measurement, handle, { drawing = false } = {}) {
    const stage = pane.viewport.stage;
    stage.setPointerCapture(event.pointerId);
    const start = [event.clientX, event.clientY];
    let moved = false;
    const move = (next) => {
      moved ||= distance([next.clientX, next.clientY], start) >= CLICK;
      measurement.points[handle] = pane.viewport.toImage(next);
      this.changed();
    };
    const up = () => {
      stage.removeEventListener("pointermove", move);
      stage.removeEventListener("pointerup", up);
      stage.removeEventListener("pointercancel", up);
      if (drawing && !moved) {
        this.remove(); // a click with a tool: nothing drawn
        return;
      }
      if (drawing && measurement.type === "angle") {
        measurement.points.push([...measurement.points[1]]);
        this.placing = { pane, measurement }; // the third point follows the pointer
      }
      this.measured(measurement);
    };
    stage.addEventListener("pointermove", move);
    stage.addEventListener("pointerup", up);
    stage.addEventListener("pointercancel", up);
  }

  // The pointer moved over `pane` with no button down: an angle's third point follows.
  hover(pane, event) {
    if (!this.placing || this.placing.pane !== pane) return;
    this.placing.measurement.points[2] = pane.viewport.toImage(event);
    this.changed();
  }

  // An ROI drawn or edited: its statistics, from the server.
  async measured(measurement) {
    if (measurement.type !== "ellipse" && measurement.type !== "rectangle") return;
    if (measurement.request) measurement.request.abort();
    const request = new AbortController();
    measurement.request = request;
    measurement.stats = null;
    this.changed();
    const { study, series, sop, frame, type, points } = measurement;
    try {
      measurement.stats = await roiStatistics(study, series, sop, frame, type, points, request.signal);
    } catch (error) {
      if (error.name === "AbortError") return;
      measurement.stats = { error: error.message };
    }
    if (measurement.request === request) measurement.request = null;
    this.changed();
  }

  // Measurements given from outside (a saved report reopened).
  load(measurements) {
    for (const measurement of measurements) this.add(measurement);
    this.changed();
  }

  close() {
    for (const measurement of this.all()) if (measurement.request) measurement.request.abort();
  }
}

// -- values and labels ---------------------------------------------------------------------

// A length in the spacing's unit (mm, mm at the detector, or px).
export function length([[x0, y0], [x1, y1]], spacing) {
  return Math.hypot((x1 - x0) * spacing.column, (y1 - y0) * spacing.row);
}

// The angle at the middle point, in degrees, measured in the patient (or in pixels).
export function angle([a, vertex, b], spacing) {
  const u = [(a[0] - vertex[0]) * spacing.column, (a[1] - vertex[1]) * spacing.row];
  const v = [(b[0] - vertex[0]) * spacing.column, (b[1] - vertex[1]) * spacing.row];
  const cos = (u[0] * v[0] + u[1] * v[1]) / (Math.hypot(...u) * Math.hypot(...v));
  return (Math.acos(Math.min(1, Math.max(-1, cos))) * 180) / Math.PI;
}

// The lines of a measurement's label.
export function label(measurement, spacing) {
  const { type, points, stats } = measurement;
  if (type === "length") return [`${fixed(length(points, spacing), 2)} ${unitOf(spacing)}`];
  if (type === "angle") return points.length === 3 ? [`${fixed(angle(points, spacing), 1)}°`] : [];
  if (!stats) return ["…"];
  if (stats.error) return [`No statistics: ${stats.error}`];
  const unit = stats.unit ? ` ${stats.unit}` : "";
  const area = stats.areaUnit === "px2" ? `${fixed(stats.area, 0)} px²` : `${fixed(stats.area, 1)} mm²${stats.spacingKind === "detector" ? " (detector)" : ""}`;
  return [
    `Mean ${fixed(stats.mean, 1)}${unit}  SD ${fixed(stats.sd, 1)}`,
    `Min ${fixed(stats.min, 1)}  Max ${fixed(stats.max, 1)}`,
    `Area ${area}`,
  ];
}

function fixed(value, digits) {
  return Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function distance(a, b) {
  return Math.hypot(a[0] - b[0], a[1] - b[1]);
}

// -- drawing ---------------------------------------------------------------------------------

// A viewport layer drawing, on `pane`, the measurements of the image it shows.
export class MeasureLayer {
  constructor(measurements, pane) {
    this.measurements = measurements;
    this.pane = pane;
    this.group = svg("g", { class: "measurements" });
    pane.viewport.svg.append(this.group);
    const hover = (event) => event.buttons || measurements.hover(pane, event);
    pane.viewport.stage.addEventListener("pointermove", hover, { signal: pane.host.signal });
  }

  render(viewport) {
    const geometry = this.pane.geometry();
    const spacing = geometry ? geometry.spacing : { row: 1, column: 1, kind: "px" };
    const shown = viewport.shown ? this.measurements.on(this.pane) : [];
    this.group.replaceChildren(...shown.map((m) => this.draw(viewport, m, spacing)));
  }

  draw(viewport, measurement, spacing) {
    const screen = measurement.points.map((p) => viewport.toScreen(p));
    const selected = measurement === this.measurements.selected;
    const grabbed = this.measurements.grabbed;
    const held = grabbed && grabbed.measurement === measurement ? grabbed.handle : -1;
    const group = svg("g", { class: `measurement ${measurement.type}${selected ? " selected" : ""}`, "data-type": measurement.type });
    if (measurement.type === "length" || measurement.type === "angle") {
      group.append(svg("polyline", { points: screen.map((p) => p.join(",")).join(" ") }));
    } else {
      const [[x0, y0], [x1, y1]] = measurement.points;
      const corners = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]].map((p) => viewport.toScreen(p));
      if (measurement.type === "rectangle") group.append(svg("polygon", { points: corners.map((p) => p.join(",")).join(" ") }));
      else {
        const xs = corners.map((p) => p[0]);
        const ys = corners.map((p) => p[1]);
        const [left, right, top, bottom] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
        group.append(svg("ellipse", { cx: (left + right) / 2, cy: (top + bottom) / 2, rx: (right - left) / 2, ry: (bottom - top) / 2 }));
      }
    }
    for (const [i, [x, y]] of screen.entries()) {
      group.append(svg("circle", { class: i === held ? "handle grabbed" : "handle", cx: x, cy: y, r: i === held ? 5 : 3 }));
    }
    const anchor = measurement.type === "angle" ? screen[1] : screen.reduce((a, b) => (b[0] > a[0] ? b : a));
    const text = svg("text", { class: "label", x: anchor[0] + 8, y: anchor[1] });
    for (const [i, line] of label(measurement, spacing).entries()) {
      const span = svg("tspan", { x: anchor[0] + 8, dy: i ? "1.2em" : "0.35em" });
      span.textContent = line;
      text.append(span);
    }
    group.append(text);
    return group;
  }
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}
