// MPR: a series that forms a volume seen as three planes, axial, coronal and sagittal,
// each in a viewport of its own. The server cuts and renders the planes (square pixels,
// the radiological way; docs/viewer-api.md, 3) and says where each plane's pixels lie in
// the patient, so a plane is a pane (pane.js) like any other: it scrolls, windows,
// zooms, turns and shows its orientation letters and scale from that mapping, and the
// other two planes' slices are its reference lines, which cross where the three meet.
// A click in a plane (or Enter at the keyboard cursor) moves the other two planes to the
// point under it: the crosshair.

import { el } from "./dom.js";
import { Panes } from "./layout.js";
import { makePlane, toPatient } from "./orientation.js";
import { mprPlanes, planeURL } from "./dicomweb.js";
import { Pane } from "./pane.js";
import { StackLoader } from "./stackloader.js";

export const PLANES = ["axial", "coronal", "sagittal"];
const AXIS = { axial: 2, coronal: 1, sagittal: 0 }; // the patient axis each plane's position is read on
const CLICK = 3; // CSS pixels: a press that moves less is a click (the crosshair), not a window drag

// Planes are fetched from the MPR endpoint; fewer at a time than slices, since three
// panes share the server.
class PlaneLoader extends StackLoader {
  constructor(pane) {
    super(pane);
    this.ahead = 4;
    this.parallel = 2;
  }

  url(index, format, quality) {
    const { study, series, plane, window } = this.view;
    return planeURL(study, series, plane, index, { window, format, quality });
  }
}

// One plane of the volume in a viewport: its stack is the plane's indices.
export class PlanePane extends Pane {
  constructor(host, number, plane) {
    super(host, number);
    this.plane = plane;
    this.loader = new PlaneLoader(this);
    this.node.dataset.plane = plane;
    this.node.setAttribute("aria-label", `${title(plane)} plane`);
    this.slider.setAttribute("aria-label", `${title(plane)} plane position`);
  }

  // Show plane `this.plane` of `source`'s series, whose MPR description is `info` (GET
  // …/mpr), with the metadata `meta` of the slice the server windows it from.
  setUp(source, info, meta) {
    this.study = source.study;
    this.series = source.series;
    this.seriesEntry = source.seriesEntry;
    this.window = source.window;
    this.preset = source.preset;
    this.sourceURL = source.url();
    this.meta = meta;
    this.frameOfReference = info.frameOfReferenceUID || "";
    this.info = info.planes[this.plane];
    const { count, width, height } = this.info;
    const label = title(this.plane);
    this.stack = Array.from({ length: count }, (_, index) => ({
      sop: `mpr:${this.plane}`, // one key per plane and index for the loader (frame = index + 1)
      frame: index + 1,
      frames: 1,
      number: index + 1,
      rows: height,
      columns: width,
      label,
    }));
    this.slider.max = String(Math.max(1, count));
  }

  currentMeta() {
    return this.meta;
  }

  // Where the plane lies at `index`, as orientation.js's geometry of a slice: image x
  // along the API's `column` vector, y along its `row`, square pixels in the patient.
  geometry(index = this.index) {
    const info = this.info;
    if (!info || !this.stack[index]) return null;
    const position = info.origin.map((o, i) => o + index * info.step[i]);
    const unit = (vector) => vector.map((v) => v / info.pixel);
    const plane = makePlane(unit(info.column), unit(info.row), position);
    return {
      plane,
      spacing: { row: info.pixel, column: info.pixel, kind: "patient" },
      frameOfReference: this.frameOfReference,
      location: position[AXIS[this.plane]],
      thickness: null,
      columns: info.width,
      rows: info.height,
    };
  }

  // The index of the plane through patient point `point` (docs/viewer-api.md, 3).
  indexAt(point) {
    const { origin, step } = this.info;
    const along = step.reduce((sum, s, i) => sum + s * (point[i] - origin[i]), 0) / step.reduce((sum, s) => sum + s * s, 0);
    return Math.min(this.stack.length - 1, Math.max(0, Math.round(along)));
  }

  // The patient point under image point `point` of the plane shown.
  patientAt(point) {
    const geometry = this.geometry();
    return geometry && geometry.plane ? toPatient(geometry.plane, geometry.spacing, point[0], point[1]) : null;
  }

  url() {
    return this.sourceURL;
  }

  // Nothing to fetch: the plane's geometry and metadata came with it.
  loadMetadata() {
    this.viewport.updateOverlays();
  }

  loadGeometry() {}

  // A primary-button click (not a drag) sets the crosshair; a drag windows, as in any pane.
  startDrag(event) {
    if (event.button === 0 && !event.shiftKey && this.stack.length) {
      const stage = this.viewport.stage;
      const start = [event.clientX, event.clientY];
      const up = (released) => {
        stage.removeEventListener("pointerup", up);
        if (Math.hypot(released.clientX - start[0], released.clientY - start[1]) < CLICK) {
          this.host.crosshair(this, this.viewport.toImage(released));
        }
      };
      stage.addEventListener("pointerup", up);
    }
    super.startDrag(event);
  }
}

// What the planes of `source`'s series (a pane's) are made from: the server's description
// of its volume (GET …/mpr, which refuses a series that is not one, saying why) and the
// metadata of the slice the server windows the planes from (the volume's first), for the
// overlays and the window a drag starts from.
export async function readVolume(source, signal) {
  const [info, meta] = await Promise.all([mprPlanes(source.study, source.series, signal), headerOf(source)]);
  return { info, meta };
}

// The metadata of the volume's first slice, through the pane (and its cache); undefined
// when it cannot be read: the planes are shown without it.
async function headerOf(source) {
  const order = source.volume && source.volume.order;
  const sop = (order && order[0]) || source.stack[source.index].sop;
  try {
    return await source.metadataOf(sop);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return undefined;
  }
}

// The three planes side by side: the layout the study view swaps in for its own while
// MPR is on (the same `panes`, `visible`, `active` and `node`; `activate` and `neighbour`
// from Panes).
export class MprLayout extends Panes {
  // `makePane(number, plane)` makes the pane of a plane; they show `source`'s series,
  // whose `volume` readVolume read.
  constructor(makePane, source, { info, meta }) {
    super();
    this.name = "mpr";
    this.panes = PLANES.map((plane, i) => makePane(i + 1, plane));
    for (const pane of this.panes) pane.setUp(source, info, meta);
    this.active = null;
    this.node = el("div", { class: "grid", "data-layout": "mpr" }, ...this.panes.map((pane) => pane.node));
  }

  get visible() {
    return this.panes;
  }

  // The three planes through the centre of the image `source` shows (without its
  // geometry, each plane's middle).
  goToCentreOf(source) {
    const here = source.geometry();
    const centre = here && here.plane ? toPatient(here.plane, here.spacing, here.columns / 2, here.rows / 2) : null;
    for (const pane of this.panes) pane.go(centre ? pane.indexAt(centre) : Math.floor(pane.stack.length / 2));
  }

  // Move the planes other than `from` through patient point `point`.
  centre(point, from = null) {
    for (const pane of this.panes) if (pane !== from) pane.go(pane.indexAt(point));
  }

  close() {
    for (const pane of this.panes) pane.close();
  }
}

function title(plane) {
  return plane[0].toUpperCase() + plane.slice(1);
}
