// The study view: the strip (strip.js) with the patient's studies and their series, the
// panes (pane.js: one series each, shown by viewport.js from frames the stack loader
// fetches) in a layout (layout.js), linked through patient space (sync.js), the toolbar
// and the keys (keys.js) acting on the active pane, and the tag panel (tagpanel.js).
// This module holds what spans panes: which studies are open, which pane is active,
// the URL (the active pane's series and instance), syncing and reference lines, MPR
// (mpr.js: its three planes replace the layout until it is left), the keyboard cursor
// (cursor.js) and the key images.
//
// Smoothness: rendered frames are cached as ImageBitmaps and neighbours are prefetched;
// requests no longer useful are aborted; while the window is dragged a JPEG is asked for
// (one in flight, the latest wins) and the exact PNG once the drag stops. The previous
// picture stays on screen until the next one is decoded, so nothing flickers.
//
// Debug API: while a study is open, `globalThis.minipacsView` is its StudyView (null
// otherwise), for the tests (tests/test_viewer*.py), the viewer benchmark
// (scripts/bench/viewer.py) and the browser console. Read, don't write; all but `panes`
// are of the active pane: `index` (the slice shown, from 0), `stack` (its slices),
// `drawn` (exact frames drawn in the active pane so far), `loading` (requests in
// flight, a Map), `shown` ({ key, bitmap } on the canvas), `message` (the viewport's
// message element), `key_(index, format)` (the key of a rendering), `panes` (those on
// the page, each with the same `index`, `stack` and its own `drawn`; in MPR the three
// planes, each with its `plane` name and `info`, the server's description of it), and
// `draw(key, bitmap)`, the one call through which the active pane's frames reach its
// canvas (a benchmark may wrap it to time-stamp them).

import { ARROWS, Cursor, CursorLayer } from "./cursor.js";
import {
  first,
  formatDate,
  instanceMetadata,
  mprPlanes,
  patientStudies,
  saveMeasurements,
  savedMeasurements,
  searchSeries,
  seriesOfInstances,
  text,
} from "./dicomweb.js";
import { button, el } from "./dom.js";
import { commandFor, helpDialog } from "./keys.js";
import { LAYOUTS, Layout } from "./layout.js";
import { MeasureLayer, Measurements, TOOLS, angle, length } from "./measure.js";
import { MprLayout, PlanePane } from "./mpr.js";
import { toPatient } from "./orientation.js";
import { Pane } from "./pane.js";
import { Strip } from "./strip.js";
import { ReferenceLines, syncFrom } from "./sync.js";
import { TagPanel } from "./tagpanel.js";

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
  return { show: (next) => view.show(next), close: () => view.close(), shows: (study) => view.studies.has(study) };
}

class StudyView {
  constructor(root, target, navigate) {
    this.navigate = navigate;
    this.study = target.study;
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.metadata = new Map(); // sop → instance metadata, for every pane
    this.studies = new Map([[this.study, { entry: null, series: null }]]); // study → QIDO-RS answers
    this.patientStudies = [];
    this.syncing = true;
    this.overlays = true;
    this.tags = new TagPanel();
    this.measurements = new Measurements(() => this.redrawMarks());
    this.cursor = new Cursor(() => this.redrawMarks());
    this.keyImages = new Map(); // sop → { study, series (null until known) }
    this.saved = new Map(); // study → what its saved report holds: { measurements, keyImages } (counts)
    this.strip = new Strip(this.study, (study) => this.openBeside(study));
    this.grid = new Layout(
      (number) => this.makePane(number),
      (pane, study, series) => this.assign(pane, study, series),
      this.signal,
    );
    this.layout = this.grid; // or, while MPR is on, its MprLayout
    this.mpr = null;
    // The series are asked for first: building the page (and its first layout) takes
    // the main thread while the server answers.
    this.ready = this.load(target); // settles once the first image and the patient's studies are in
    this.build(root);
    globalThis.minipacsView = this; // the debug API (above)
  }

  makePane(number) {
    const pane = new Pane(this, number);
    pane.references = new ReferenceLines(pane, () => this.layout.visible);
    pane.viewport.layers.push(pane.references, new MeasureLayer(this.measurements, pane), new CursorLayer(this.cursor, pane));
    pane.viewport.overlays = this.overlays;
    return pane;
  }

  // A pane of an MPR plane: the other planes are its reference lines (the crosshair).
  makePlanePane(number, plane) {
    const pane = new PlanePane(this, number, plane);
    pane.references = new ReferenceLines(pane, () => this.layout.visible);
    pane.viewport.layers.push(pane.references, new CursorLayer(this.cursor, pane));
    pane.viewport.overlays = this.overlays;
    return pane;
  }

  // Every pane made: the layout's, and MPR's while it is on.
  allPanes() {
    return [...this.grid.panes, ...(this.mpr ? this.mpr.panes : [])];
  }

  get active() {
    return this.layout.active;
  }

  // -- debug API names kept for the tests and the benchmark ------------------------------

  get index() {
    return this.active.index;
  }

  get stack() {
    return this.active.stack;
  }

  get loading() {
    return this.active.loader.loading;
  }

  get shown() {
    return this.active.viewport.shown;
  }

  get message() {
    return this.active.viewport.message;
  }

  get drawn() {
    return this.active.drawn;
  }

  get panes() {
    return this.layout.visible;
  }

  key_(index, format) {
    return this.active.loader.key(index, format);
  }

  // The one way the active pane's frames reach its canvas (key null: a stand-in).
  draw(key, bitmap) {
    this.active.paint(key, bitmap);
  }

  // -- the page ----------------------------------------------------------------------------

  build(root) {
    this.layoutSelect = el("select", { "aria-label": "Layout", class: "layout" });
    this.layoutSelect.append(...LAYOUTS.map(([name, label]) => el("option", { value: name }, label)), el("option", { value: "mpr" }, "MPR"));
    this.layoutSelect.addEventListener("change", () => {
      if (this.layoutSelect.value === "mpr") this.run("mpr");
      else this.setLayout(this.layoutSelect.value);
    });
    this.presetSelect = el("select", { "aria-label": "Window preset", class: "preset" });
    this.presetSelect.addEventListener("change", () => this.applyPreset(this.presetSelect.value));
    this.fpsInput = el("input", { type: "number", min: "1", max: "60", value: "10", "aria-label": "Frames per second", class: "fps" });
    this.fpsInput.addEventListener("change", () => {
      const pane = this.active;
      pane.fps = Math.min(60, Math.max(1, Number(this.fpsInput.value) || 10));
      if (pane.cine) pane.startCine();
    });
    this.playButton = button("▶ Cine", () => this.run("cine"), { "aria-pressed": "false", class: "cine", title: "Cine (C)" });
    this.invertButton = button("Invert", () => this.run("invert"), { "aria-pressed": "false", title: "Invert (I)" });
    this.syncButton = button("Sync", () => this.run("sync"), { "aria-pressed": "true", title: "Viewports on one frame of reference scroll together (S)" });
    this.linesButton = button("Ref lines", () => this.run("referenceLines"), { "aria-pressed": "true", title: "Reference lines (Y)" });
    this.overlayButton = button("Overlays", () => this.run("overlays"), { "aria-pressed": "true", title: "Overlays (O)" });
    this.tagButton = button("Tags", () => this.run("tags"), { "aria-pressed": "false", title: "Tag panel (T)" });
    this.download = el("a", { class: "download", download: "" }, "Download");
    this.seriesZip = el("a", { class: "download", download: "", title: "The series' files and a DICOMDIR" }, "Series ZIP");
    this.help = helpDialog();
    const tool = (label, command, attributes) => button(label, () => this.run(command), attributes);
    const tools = { window: ["W/L", "W"], length: ["Length", "D"], angle: ["Angle", "A"], ellipse: ["Ellipse", "E"], rectangle: ["Rectangle", "B"] };
    this.toolButtons = ["window", ...TOOLS].map((name) => {
      const [label, key] = tools[name];
      const title = name === "window" ? `Dragging sets the window (${key})` : `Draw: ${name} (${key})`;
      return tool(label, `tool${name[0].toUpperCase()}${name.slice(1)}`, { "aria-pressed": String(name === "window"), "data-tool": name, title });
    });
    this.mprButton = tool("MPR", "mpr", { "aria-pressed": "false", title: "Axial, coronal and sagittal planes of a volume, or back (M)" });
    this.keyButton = tool("★ Key", "keyImage", { "aria-pressed": "false", "aria-label": "Key image", title: "Mark or unmark the image as a key image (K)" });
    this.cursorButton = tool("Cursor", "cursor", { "aria-pressed": "false", title: "Keyboard cursor: arrows move it, Enter places a point (X)" });
    this.saveButton = tool("Save", "save", { hidden: "", title: "Save the study's measurements and key images as DICOM (SR and KOS; Ctrl+S)" });
    this.status = el("output", { class: "status", "aria-live": "polite" });
    const toolbar = el(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Image tools" },
      el("label", {}, "Layout ", this.layoutSelect),
      el("label", {}, "Window ", this.presetSelect),
      this.invertButton,
      tool("Fit", "fit", { title: "Fit (F)" }),
      tool("1:1", "actualSize", { title: "Actual size (Z)" }),
      tool("−", "zoomOut", { "aria-label": "Zoom out", title: "Zoom out (−)" }),
      tool("+", "zoomIn", { "aria-label": "Zoom in", title: "Zoom in (+)" }),
      tool("⟲", "rotateLeft", { "aria-label": "Rotate left", title: "Rotate 90° anticlockwise (Shift+R)" }),
      tool("⟳", "rotateRight", { "aria-label": "Rotate right", title: "Rotate 90° clockwise (R)" }),
      tool("⇆", "flipH", { "aria-label": "Flip horizontally", title: "Flip left–right (H)" }),
      tool("⇅", "flipV", { "aria-label": "Flip vertically", title: "Flip top–bottom (V)" }),
      tool("Reset", "reset", { title: "Reset (Space)" }),
      this.playButton,
      el("label", {}, "fps ", this.fpsInput),
      this.syncButton,
      this.linesButton,
      this.overlayButton,
      this.tagButton,
      tool("?", "help", { "aria-label": "Keys", title: "Keys (?)" }),
      this.mprButton,
      el("span", { class: "tools", role: "group", "aria-label": "Tool" }, ...this.toolButtons),
      this.cursorButton,
      this.keyButton,
      this.saveButton,
      this.download,
      this.seriesZip,
      el("a", { href: "/", "data-link": "" }, "Studies"),
      this.status, // last: a long message does not push the controls about
    );
    const centre = el("section", { class: "viewer" }, toolbar, this.grid.node);
    root.append(el("div", { class: "study-view" }, this.strip.node, centre, this.tags.node), this.help);
    document.addEventListener("keydown", (event) => this.key(event), { signal: this.signal });
  }

  key(event) {
    if (this.help.open) return; // the dialog has the keys (Escape closes it)
    const command = commandFor(event);
    if (!command) return;
    event.preventDefault();
    this.run(command, event.key, event.shiftKey);
  }

  // Every command of the toolbar and the keys (keys.js names them); `key` and `shift`:
  // the key pressed, when one was.
  run(command, key = "", shift = false) {
    const pane = this.active;
    const viewport = pane.viewport;
    const arrow = this.cursor.on && ARROWS[key];
    const commands = {
      next: () => (arrow ? this.moveCursor(arrow, shift) : pane.go(pane.index + 1)),
      previous: () => (arrow ? this.moveCursor(arrow, shift) : pane.go(pane.index - 1)),
      window: () => (arrow ? this.moveCursor(arrow, shift) : pane.stepWindow(ARROWS[key])),
      forward10: () => pane.go(pane.index + 10),
      back10: () => pane.go(pane.index - 10),
      firstImage: () => pane.go(0),
      lastImage: () => pane.go(pane.stack.length - 1),
      nextSeries: () => this.stepSeries(1),
      previousSeries: () => this.stepSeries(-1),
      preset: () => this.presetNumber(Number(key)),
      fileWindow: () => this.applyPreset("file"),
      invert: () => viewport.toggleInvert(),
      cine: () => pane.toggleCine(),
      fit: () => viewport.setFit(),
      actualSize: () => viewport.setZoom(1),
      zoomIn: () => viewport.setZoom(viewport.zoom * 1.25),
      zoomOut: () => viewport.setZoom(viewport.zoom / 1.25),
      rotateRight: () => viewport.rotate(1),
      rotateLeft: () => viewport.rotate(-1),
      flipH: () => viewport.flip("h"),
      flipV: () => viewport.flip("v"),
      reset: () => pane.reset(),
      nextLayout: () => (this.mpr ? this.exitMpr() : this.setLayout(this.layout.next())),
      mpr: () => (this.mpr ? this.exitMpr() : this.enterMpr()),
      keyImage: () => this.toggleKeyImage(),
      cursor: () => this.toggleCursor(),
      place: () => this.place(),
      grab: () => this.grab(key === "G" ? -1 : 1),
      nextPane: () => this.activate(this.layout.neighbour(1), { focus: this.focusOnViewports() }),
      previousPane: () => this.activate(this.layout.neighbour(-1), { focus: this.focusOnViewports() }),
      sync: () => this.toggleSync(),
      referenceLines: () => this.toggleReferenceLines(),
      overlays: () => this.toggleOverlays(),
      tags: () => this.toggleTags(),
      help: () => this.help.showModal(),
      toolWindow: () => this.setTool("window"),
      toolLength: () => this.setTool("length"),
      toolAngle: () => this.setTool("angle"),
      toolEllipse: () => this.setTool("ellipse"),
      toolRectangle: () => this.setTool("rectangle"),
      deleteMeasurement: () => this.measurements.remove(pane),
      escape: () => {
        this.measurements.escape();
        this.status.value = "";
      },
      save: () => (this.saveButton.hidden ? (this.status.value = "This server does not save measurements.") : this.save()),
    };
    const action = commands[command];
    if (!action) return;
    action();
    this.syncToolbar();
  }

  // The toolbar as the active pane has it.
  syncToolbar() {
    const pane = this.active;
    this.layoutSelect.value = this.layout.name;
    this.setPresets(pane);
    this.invertButton.setAttribute("aria-pressed", String(pane.viewport.invert));
    this.playButton.textContent = pane.cine ? "❚❚ Stop" : "▶ Cine";
    this.playButton.setAttribute("aria-pressed", String(Boolean(pane.cine)));
    this.fpsInput.value = String(pane.fps);
    this.syncButton.setAttribute("aria-pressed", String(this.syncing));
    this.linesButton.setAttribute("aria-pressed", String(pane.references.shown));
    this.overlayButton.setAttribute("aria-pressed", String(this.overlays));
    this.tagButton.setAttribute("aria-pressed", String(this.tags.open));
    for (const node of this.toolButtons) node.setAttribute("aria-pressed", String(node.dataset.tool === this.measurements.tool));
    const slice = pane.stack[pane.index];
    this.mprButton.setAttribute("aria-pressed", String(Boolean(this.mpr)));
    this.keyButton.setAttribute("aria-pressed", String(Boolean(slice) && this.isKeyImage(slice.sop)));
    this.cursorButton.setAttribute("aria-pressed", String(this.cursor.on));
    this.seriesZip.href = pane.series ? `/studies/${pane.study}/series/${pane.series}/archive` : "";
    this.download.href = slice && !pane.plane
      ? `/wado?requestType=WADO&studyUID=${pane.study}&seriesUID=${pane.series}&objectUID=${slice.sop}&contentType=application%2Fdicom&transferSyntax=*`
      : "";
  }

  // -- loading the studies -------------------------------------------------------------------

  async load(target) {
    document.title = "Study — minipacs";
    let seriesList;
    try {
      seriesList = await this.loadSeries(this.study);
    } catch (error) {
      this.fail(error);
      return;
    }
    if (!seriesList.length) {
      this.active.viewport.showMessage("This study has no series.");
      return;
    }
    await this.show(target);
    // The thumbnails and the patient's other studies would compete on the server with
    // the first image: they are asked for once it is drawn, or has failed, or there is
    // none to draw.
    await this.active.currentLoad;
    if (this.signal.aborted) return;
    this.strip.loadThumbnails();
    await Promise.all([this.loadPatientStudies(), this.loadSaved()]);
  }

  // Study `study`'s series in series number order (asked for once).
  async loadSeries(study) {
    const known = this.studies.get(study) || { entry: null, series: null };
    this.studies.set(study, known);
    if (!known.series) {
      known.series = searchSeries(study, this.signal).then((list) =>
        list.sort((a, b) => (first(a, "00200011") ?? 1e9) - (first(b, "00200011") ?? 1e9)),
      );
      known.series.catch(() => {
        known.series = null; // asked again next time
      });
      const list = await known.series;
      this.strip.showSeries(study, list, study === this.study ? "This study" : studyHeading(known.entry));
    }
    return known.series;
  }

  async loadPatientStudies() {
    try {
      this.patientStudies = await patientStudies(this.study, this.signal);
    } catch {
      return; // the strip lists this study's series only
    }
    for (const entry of this.patientStudies) {
      const uid = first(entry, "0020000D");
      const known = this.studies.get(uid) || { entry: null, series: null };
      known.entry = entry;
      this.studies.set(uid, known);
    }
    this.strip.showStudies(this.patientStudies);
  }

  // Show `target` ({ study, series, sop, frame } from the URL) in the active pane (of
  // the layout: MPR is left).
  async show(target) {
    this.exitMpr();
    const study = target.study || this.study;
    let list;
    try {
      list = await this.loadSeries(study);
    } catch (error) {
      this.fail(error);
      return;
    }
    const pane = this.active;
    const series = target.series || first(list[0], "0020000E");
    if (pane.study !== study || pane.series !== series) {
      const entry = list.find((s) => first(s, "0020000E") === series);
      if (!entry) {
        pane.viewport.showMessage("This series is not in the study.");
        return;
      }
      await pane.open(study, entry, { sop: target.sop, frame: target.frame || 1 });
      if (pane.series !== series) return;
    }
    let index = 0;
    if (target.sop) {
      index = pane.stack.findIndex((s) => s.sop === target.sop && s.frame === (target.frame || 1));
      if (index < 0) index = Math.max(0, pane.stack.findIndex((s) => s.sop === target.sop));
    }
    pane.go(index, { fromUrl: true });
  }

  // Open `series` of `study` in `pane` (dropped there, or chosen for it).
  async assign(pane, study, series) {
    let list;
    try {
      list = await this.loadSeries(study);
    } catch (error) {
      this.fail(error);
      return;
    }
    const entry = list.find((s) => first(s, "0020000E") === series);
    if (!entry) return;
    this.exitMpr();
    this.activate(pane);
    await pane.open(study, entry);
    if (pane.series === series) pane.go(0);
  }

  // A study of the patient's list was chosen: its series most like the active pane's
  // (same modality, else the first) opens in the pane beside the active one.
  async openBeside(study) {
    this.exitMpr();
    if (this.layout.name === "1x1") this.setLayout("1x2", { fill: false });
    const pane = this.layout.neighbour(1);
    const series = await this.likeActive(study);
    if (series) await this.assign(pane, study, first(series, "0020000E"));
  }

  async likeActive(study) {
    let list;
    try {
      list = await this.loadSeries(study);
    } catch {
      return null;
    }
    const modality = this.active.modality;
    return list.find((s) => text(s, "00080060") === modality) || list[0] || null;
  }

  setLayout(name, { fill = true } = {}) {
    this.exitMpr();
    const added = this.layout.set(name);
    for (const pane of this.grid.panes) if (!this.grid.visible.includes(pane)) pane.stopCine();
    this.syncToolbar();
    if (fill) this.fill(added.filter((pane) => !pane.series));
  }

  // Panes a larger layout adds get, in turn: the newest other study of the patient (to
  // compare), then this study's series not on the page yet.
  async fill(panes) {
    if (!panes.length) return;
    await this.ready;
    const wanted = [];
    const other = this.patientStudies.map((s) => first(s, "0020000D")).find((uid) => uid !== this.study);
    if (other) {
      const series = await this.likeActive(other);
      if (series) wanted.push([other, first(series, "0020000E")]);
    }
    const onPage = new Set(this.grid.visible.map((pane) => pane.series));
    for (const series of await this.loadSeries(this.study)) {
      const uid = first(series, "0020000E");
      if (!onPage.has(uid)) wanted.push([this.study, uid]);
    }
    for (const pane of panes) {
      const next = wanted.shift();
      if (!next) break;
      if (pane.series) continue;
      const [study, series] = next;
      const entry = (await this.loadSeries(study)).find((s) => first(s, "0020000E") === series);
      pane.open(study, entry).then(() => {
        if (pane.series === series) pane.go(0);
      });
    }
  }

  // Series `step` places from the active pane's, in its study.
  async stepSeries(step) {
    const pane = this.active;
    if (!pane.series) return;
    const list = await this.loadSeries(pane.study);
    const at = list.findIndex((s) => first(s, "0020000E") === pane.series);
    const next = list[at + step];
    if (next) this.navigate(`/study/${pane.study}/series/${first(next, "0020000E")}`);
  }

  // Whether the focus is on a viewport (or nowhere): ] and [ take it along to the next
  // one; from the strip they leave it there, so that Enter on a series opens it in the
  // viewport chosen, the keyboard's way to drop a series on a viewport.
  focusOnViewports() {
    const focused = document.activeElement;
    return !focused || focused === document.body || this.layout.node.contains(focused);
  }

  // -- what panes tell the view --------------------------------------------------------------

  activate(pane, { focus = false } = {}) {
    if (focus) pane.viewport.stage.focus(); // its focus handler comes back here
    if (!this.layout.activate(pane)) return;
    if (pane.stack.length) history.replaceState({}, "", pane.url());
    this.strip.mark(pane.study, pane.series);
    this.syncToolbar();
    this.showMeta(pane);
  }

  moved(pane, { fromUrl, synced }) {
    if (pane === this.active) {
      const url = pane.url();
      if (!fromUrl || location.pathname + location.search !== url) history.replaceState({}, "", url);
      this.syncToolbar();
    }
    if (!synced && this.syncing) syncFrom(pane, this.layout.visible);
    this.redrawOthers(pane);
  }

  loaded(pane) {
    if (pane !== this.active) return;
    this.strip.mark(pane.study, pane.series);
    this.syncToolbar();
  }

  // The pane's geometry may be new: what was linked without it is linked now.
  metadataShown(pane) {
    if (pane === this.active) this.showMeta(pane);
    this.geometryLoaded(pane);
  }

  geometryLoaded(pane) {
    const active = this.active;
    if (this.syncing) syncFrom(active, pane === active ? this.layout.visible : [pane]);
    this.redrawOthers(pane);
  }

  windowChanged(pane) {
    if (pane === this.active) this.presetSelect.value = "custom";
  }

  // A pointer press on a pane for a measurement (measure.js); false: the pane's own.
  drag(pane, event) {
    return !pane.plane && this.measurements.press(pane, event);
  }

  redrawMarks() {
    for (const pane of this.layout.visible) pane.viewport.renderLayers();
  }

  redrawOthers(pane) {
    for (const other of this.layout.visible) if (other !== pane) other.viewport.renderLayers();
  }

  // The header line and the tag panel show the active pane's instance.
  showMeta(pane) {
    const meta = pane.currentMeta();
    this.tags.render(meta);
    if (!meta) return;
    document.getElementById("where").textContent = `${text(meta, "00100010")} · ${formatDay(meta)} · ${text(meta, "00081030")}`;
    document.title = `${text(meta, "00100010")} — minipacs`;
  }

  // -- windows -------------------------------------------------------------------------------

  setPresets(pane) {
    const options = [["file", "File"], ["auto", "Auto"]];
    for (const [name, center, width] of PRESETS[pane.modality] || []) options.push([`${center},${width}`, `${name} (${center}/${width})`]);
    options.push(["custom", "Custom"]);
    const key = options.map(([value]) => value).join("|");
    if (this.presetSelect.dataset.options !== key) {
      this.presetSelect.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
      this.presetSelect.querySelector("[value=custom]").disabled = true;
      this.presetSelect.dataset.options = key;
    }
    this.presetSelect.value = pane.preset;
    if (!this.presetSelect.value) {
      pane.applyPreset("file");
      this.presetSelect.value = "file";
    }
  }

  // The preset applies to the active pane, or in MPR to the three planes.
  applyPreset(value) {
    for (const pane of this.mpr ? this.mpr.panes : [this.active]) pane.applyPreset(value);
    this.presetSelect.value = value;
  }

  // Preset `number` (from 1) of the active pane's modality.
  presetNumber(number) {
    const preset = (PRESETS[this.active.modality] || [])[number - 1];
    if (preset) this.applyPreset(`${preset[1]},${preset[2]}`);
  }

  // -- measurements ----------------------------------------------------------------------------

  setTool(name) {
    this.measurements.tool = name;
    for (const pane of this.grid.panes) pane.viewport.stage.classList.toggle("drawing", name !== "window");
  }

  // The study's last saved report (docs/viewer-api.md, 4): its measurements are shown
  // again, and Save appears (a server without the endpoint has neither).
  async loadSaved() {
    let report;
    try {
      report = await savedMeasurements(this.study, this.signal);
    } catch {
      return;
    }
    this.saveButton.hidden = false;
    this.saved.set(this.study, { measurements: report.measurements.length, keyImages: (report.keyImages || []).length });
    this.loadKeyImages(report.keyImages || []);
    this.measurements.load(
      report.measurements.map((item) => ({
        type: item.type,
        study: this.study,
        series: "", // the pane that shows it fills it in
        sop: item.sopInstanceUID,
        frame: item.frame || 1,
        points: item.points,
        stats: item.stats || null,
      })),
    );
  }

  // Save the active pane's study's measurements as an SR and its key images as a Key
  // Object Selection, as they are now: what was saved and is gone now is cleared (the
  // server writes a report with no measurement, or no selection; the old ones stay in
  // the archive). Only what was loaded can be cleared: a study whose saved report this
  // view did not open (a prior) sends nothing when nothing is drawn.
  async save() {
    const study = this.active.study;
    const measurements = this.measurements
      .all()
      .filter((m) => m.study === study && m !== this.measurements.keyed && (m.type !== "angle" || m.points.length === 3))
      .map((m) => {
        const spacing = this.spacingOf(m);
        const found = { type: m.type, sopInstanceUID: m.sop, frame: m.frame, points: m.points };
        if (m.type === "length") return { ...found, value: length(m.points, spacing), unit: spacing.kind === "px" ? "px" : "mm" };
        if (m.type === "angle") return { ...found, value: angle(m.points, spacing), unit: "deg" };
        return found;
      });
    const keyImages = [...this.keyImages]
      .filter(([, image]) => image.study === study)
      .map(([sop]) => ({ sopInstanceUID: sop, frame: 1 }));
    const before = this.saved.get(study) || { measurements: 0, keyImages: 0 };
    if (!measurements.length && !keyImages.length && !before.measurements && !before.keyImages) {
      this.status.value = "Nothing to save on this study.";
      return;
    }
    this.status.value = "Saving…";
    const count = (n, what) => (n ? `${n} ${what}${n === 1 ? "" : "s"}` : "");
    try {
      await saveMeasurements(study, { measurements, keyImages, description: "" }, this.signal);
      this.saved.set(study, { measurements: measurements.length, keyImages: keyImages.length });
      const saved = [count(measurements.length, "measurement"), count(keyImages.length, "key image")].filter(Boolean);
      const cleared = [!measurements.length && before.measurements && "measurements", !keyImages.length && before.keyImages && "key images"].filter(Boolean);
      const said = [saved.length && `saved ${saved.join(" and ")}`, cleared.length && `cleared the saved ${cleared.join(" and ")}`].filter(Boolean).join("; ");
      this.status.value = `${said[0].toUpperCase()}${said.slice(1)}.`;
    } catch (error) {
      if (error.name !== "AbortError") this.status.value = error.status === 403 ? "Saving needs the uploader role." : `Not saved: ${error.message}`;
    }
  }

  // The spacing of a measurement's image, from a pane that has its series.
  spacingOf(measurement) {
    for (const pane of this.grid.panes) {
      const index = pane.stack.findIndex((s) => s.sop === measurement.sop && s.frame === measurement.frame);
      const geometry = index >= 0 && pane.geometry(index);
      if (geometry) return geometry.spacing;
    }
    return { row: 1, column: 1, kind: "px" };
  }

  // -- key images ------------------------------------------------------------------------------
  // Whole instances, as a Key Object Selection keeps them (a frame is not kept): marking
  // a frame of a multi-frame instance marks the instance.

  isKeyImage(sop) {
    return this.keyImages.has(sop);
  }

  toggleKeyImage() {
    const pane = this.active;
    const slice = pane.stack[pane.index];
    if (pane.plane) {
      this.status.value = "An MPR plane is not an image of the archive: mark a slice of the series.";
      return;
    }
    if (!slice) return;
    const marked = !this.keyImages.has(slice.sop);
    if (marked) this.keyImages.set(slice.sop, { study: pane.study, series: pane.series });
    else this.keyImages.delete(slice.sop);
    this.status.value = marked ? "Marked as a key image." : "No longer a key image.";
    this.keyImagesChanged(pane.study);
  }

  // The key images of the study's saved Key Object Selection; their series (for the
  // strip) from QIDO-RS.
  async loadKeyImages(items) {
    for (const item of items) this.keyImages.set(item.sopInstanceUID, { study: this.study, series: null });
    this.keyImagesChanged(this.study);
    if (!items.length) return;
    try {
      const found = await seriesOfInstances(this.study, items.map((item) => item.sopInstanceUID), this.signal);
      for (const [sop, series] of found) if (this.keyImages.has(sop)) this.keyImages.get(sop).series = series;
    } catch {
      return; // the overlays show them; the strip does not count them
    }
    this.keyImagesChanged(this.study);
  }

  // The overlays, the toolbar and the strip's counts of `study` say what is marked now.
  keyImagesChanged(study) {
    for (const pane of this.layout.visible) pane.viewport.updateOverlays();
    this.syncToolbar();
    const counts = new Map();
    for (const image of this.keyImages.values()) {
      if (image.study === study && image.series) counts.set(image.series, (counts.get(image.series) || 0) + 1);
    }
    this.strip.showKeyImages(study, counts);
  }

  // -- the keyboard cursor -----------------------------------------------------------------------

  moveCursor(direction, shift) {
    const pane = this.active;
    if (!pane.stack.length) return;
    this.measurements.follow(pane, this.cursor.move(pane, direction, shift ? 10 : 1));
  }

  // Turned off, it lets go of a grabbed point where it is.
  toggleCursor() {
    this.cursor.toggle(this.active);
    if (!this.cursor.on) this.measurements.release();
  }

  // Enter: a grabbed point stays where it is; else at the cursor (turned on first when
  // it is off), the tool's next point, or in MPR the crosshair.
  place() {
    const pane = this.active;
    if (this.measurements.release()) {
      this.status.value = "";
      return;
    }
    if (!pane.stack.length || !pane.viewport.shown) return;
    if (!this.cursor.on) {
      this.cursor.toggle(pane);
      return;
    }
    const point = this.cursor.at(pane);
    if (pane.plane) this.crosshair(pane, point);
    else if (!this.measurements.place(pane, point)) this.status.value = "Choose a tool (D, A, E or B) to place points with Enter.";
  }

  // g: the next point of a measurement on the image (G: the previous) for the cursor,
  // turned on there, to move; Enter leaves it, Esc puts it back.
  grab(step) {
    const pane = this.active;
    if (pane.plane || !pane.viewport.shown) return;
    if (this.measurements.keyed || this.measurements.placing) {
      this.status.value = "Finish the measurement being drawn first (Enter), or drop it (Esc).";
      return;
    }
    const point = this.measurements.grab(pane, step);
    if (!point) {
      this.status.value = "No measurement on this image.";
      return;
    }
    this.cursor.moveTo(pane, point);
    this.status.value = "Arrows move the point (Shift: ten pixels); Enter leaves it there, Esc puts it back.";
  }

  // -- MPR ---------------------------------------------------------------------------------------

  // The active pane's series as three planes, if the server says it is a volume (else its
  // reason, and nothing changes).
  async enterMpr() {
    const source = this.active;
    if (this.mpr || this.enteringMpr || !source.stack.length) return;
    this.enteringMpr = true;
    this.status.value = "MPR: reading the volume…";
    let info;
    let meta;
    try {
      [info, meta] = await Promise.all([mprPlanes(source.study, source.series, this.signal), this.headerOf(source)]);
    } catch (error) {
      if (error.name !== "AbortError") this.status.value = `No MPR: ${error.message}`;
      return;
    } finally {
      this.enteringMpr = false;
      this.syncToolbar();
    }
    if (source !== this.active || this.mpr) return; // moved on meanwhile
    for (const pane of this.grid.panes) pane.stopCine();
    const mpr = new MprLayout((number, plane) => this.makePlanePane(number, plane));
    for (const pane of mpr.panes) pane.setUp(source, info, meta);
    this.mpr = mpr;
    this.layout = mpr;
    this.grid.node.replaceWith(mpr.node);
    this.activate(mpr.panes[0], { focus: true });
    // The three planes through the centre of the image the series was showing.
    const here = source.geometry();
    const centre = here && here.plane ? toPatient(here.plane, here.spacing, here.columns / 2, here.rows / 2) : null;
    for (const pane of mpr.panes) pane.go(centre ? pane.indexAt(centre) : Math.floor(pane.stack.length / 2));
    this.status.value = "MPR: a click (or Enter at the cursor, X) moves the crosshair; M leaves.";
    this.syncToolbar();
  }

  // The metadata of the slice the server windows the planes from (the volume's first),
  // for the overlays and the window a drag starts from.
  async headerOf(source) {
    const order = source.volume && source.volume.order;
    const sop = (order && order[0]) || source.stack[source.index].sop;
    if (!this.metadata.has(sop)) {
      try {
        this.metadata.set(sop, await instanceMetadata(source.study, source.series, sop, this.signal));
      } catch (error) {
        if (error.name === "AbortError") throw error;
      }
    }
    return this.metadata.get(sop);
  }

  // Back to the layout as it was.
  exitMpr() {
    const mpr = this.mpr;
    if (!mpr) return;
    this.mpr = null;
    this.layout = this.grid;
    mpr.node.replaceWith(this.grid.node);
    mpr.close();
    const pane = this.grid.active;
    if (mpr.panes.includes(this.cursor.pane)) this.cursor.pane = null;
    if (pane.stack.length) history.replaceState({}, "", pane.url());
    this.strip.mark(pane.study, pane.series);
    this.showMeta(pane);
    this.status.value = "";
    this.syncToolbar();
    pane.viewport.stage.focus();
  }

  // The other planes through the patient point under image point `point` of plane `pane`.
  crosshair(pane, point) {
    const at = this.mpr && pane.patientAt(point);
    if (at) this.mpr.centre(at, pane);
  }

  // -- toggles -------------------------------------------------------------------------------

  toggleSync() {
    this.syncing = !this.syncing;
    if (this.syncing) syncFrom(this.active, this.layout.visible);
  }

  toggleReferenceLines() {
    const shown = !this.active.references.shown;
    for (const pane of this.allPanes()) {
      pane.references.shown = shown;
      pane.viewport.renderLayers();
    }
  }

  toggleOverlays() {
    this.overlays = !this.overlays;
    for (const pane of this.allPanes()) {
      pane.viewport.overlays = this.overlays;
      pane.viewport.updateOverlays();
    }
  }

  toggleTags() {
    this.tags.toggle();
    this.showMeta(this.active);
  }

  // -- failing and closing -----------------------------------------------------------------

  fail(error) {
    if (error.name === "AbortError") return;
    this.active.viewport.showMessage(error.status === 404 ? "This study is not in the archive." : `Server error: ${error.message}`);
  }

  close() {
    this.controller.abort();
    this.measurements.close();
    for (const pane of this.allPanes()) pane.close();
    this.help.remove();
    globalThis.minipacsView = null;
  }
}

function studyHeading(entry) {
  if (!entry) return "Other study";
  return `${formatDay(entry)} ${text(entry, "00080061")}`.trim();
}

function formatDay(item) {
  return formatDate(first(item, "00080020"));
}
