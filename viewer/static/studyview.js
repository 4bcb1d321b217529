// The study view: the composition of the parts of a study's page and the wiring between
// them. The strip (strip.js) lists the patient's studies and their series (studies.js
// asks for them); the panes (pane.js: one series each, shown by viewport.js from frames
// the stack loader fetches) sit in a layout (layout.js), linked through patient space
// (sync.js), and open the series opener.js chooses; the toolbar (toolbar.js) and the
// keys (keys.js) run commands (commands.js) on the active pane; the tag panel
// (tagpanel.js) shows its instance; the report (report.js) keeps the key images and
// saves and reopens the measurements (measure.js). This module holds what spans panes:
// which pane is active, the URL (the active pane's series and instance), syncing,
// reference lines and overlays, the layout and MPR (mpr.js: its three planes replace
// the layout until it is left), and the keyboard cursor (cursor.js).
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

import { Commands } from "./commands.js";
import { Cursor, CursorLayer } from "./cursor.js";
import { text } from "./dicomweb.js";
import { el } from "./dom.js";
import { commandFor, helpDialog } from "./keys.js";
import { Layout } from "./layout.js";
import { MeasureLayer, Measurements } from "./measure.js";
import { MprLayout, PlanePane, readVolume } from "./mpr.js";
import { Opener } from "./opener.js";
import { Pane } from "./pane.js";
import { Report } from "./report.js";
import { Strip } from "./strip.js";
import { Studies, studyDay } from "./studies.js";
import { ReferenceLines, syncFrom } from "./sync.js";
import { TagPanel } from "./tagpanel.js";
import { Toolbar } from "./toolbar.js";

export function studyView(root, target, navigate) {
  const view = new StudyView(root, target, navigate);
  return { show: (next) => view.opener.show(next), close: () => view.close(), shows: (study) => view.studies.has(study) };
}

class StudyView {
  constructor(root, target, navigate) {
    this.navigate = navigate;
    this.study = target.study;
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.metadata = new Map(); // sop → instance metadata, for every pane
    this.metadataAsked = new Map(); // sop → its metadata request while it is out (pane.js)
    this.syncing = true;
    this.overlays = true;
    this.tags = new TagPanel();
    this.measurements = new Measurements(() => this.redrawMarks());
    this.cursor = new Cursor(() => this.redrawMarks());
    this.commands = new Commands(this);
    this.report = new Report(
      this.measurements,
      { changed: (study) => this.keyImagesChanged(study), say: (message) => this.say(message) },
      this.signal,
    );
    this.opener = new Opener(this);
    this.strip = new Strip(this.study, (study) => this.opener.openBeside(study));
    this.studies = new Studies(this.study, this.strip, this.signal);
    this.grid = new Layout(
      (number) => this.makePane(number),
      (pane, study, series) => this.opener.assign(pane, study, series),
      this.signal,
    );
    this.layout = this.grid; // or, while MPR is on, its MprLayout
    this.mpr = null;
    // The series are asked for first: building the page (and its first layout) takes
    // the main thread while the server answers.
    this.ready = this.load(target); // settles once the first image, the patient's studies and the saved report are in
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
    this.toolbar = new Toolbar({
      run: (command) => this.run(command),
      setLayout: (name) => this.setLayout(name),
      applyPreset: (value) => this.applyPreset(value),
      setFps: (fps) => this.setFps(fps),
    });
    this.help = helpDialog();
    const centre = el("section", { class: "viewer" }, this.toolbar.node, this.grid.node);
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

  // Every command of the toolbar and the keys (commands.js); then the toolbar shows the
  // active pane as the command left it.
  run(command, key = "", shift = false) {
    if (this.commands.run(command, key, shift)) this.syncToolbar();
  }

  // The toolbar as the active pane has it.
  syncToolbar() {
    const pane = this.active;
    const slice = pane.stack[pane.index];
    this.toolbar.show(pane, {
      layout: this.layout.name,
      mpr: Boolean(this.mpr),
      syncing: this.syncing,
      overlays: this.overlays,
      tags: this.tags.open,
      tool: this.measurements.tool,
      keyImage: Boolean(slice) && this.report.isKeyImage(slice.sop),
      cursor: this.cursor.on,
      canSave: this.report.canSave,
    });
  }

  // The status line of the toolbar.
  say(message) {
    this.toolbar.say(message);
  }

  // -- loading ---------------------------------------------------------------------------

  // The study's series, `target` in the first pane, then what waits for the first image.
  async load(target) {
    document.title = "Study — minipacs";
    let seriesList;
    try {
      seriesList = await this.studies.series(this.study);
    } catch (error) {
      this.fail(error);
      return;
    }
    if (!seriesList.length) {
      this.active.viewport.showMessage("This study has no series.");
      return;
    }
    await this.opener.show(target);
    // The thumbnails, the patient's other studies and the saved report would compete on
    // the server with the first image: they are asked for once it is drawn, or has
    // failed, or there is none to draw. The report first, before the thumbnails take the
    // browser's connections to the server: Save and the saved measurements come soonest.
    await this.active.loader.currentLoad;
    if (this.signal.aborted) return;
    const report = this.report.load(this.study);
    this.strip.loadThumbnails();
    await Promise.all([this.studies.loadPatient(), report]);
  }

  // Save `study`'s measurements and key images (report.js), then show its series again:
  // the strip lists the SR and KO series the save added without a reload.
  async saveReport(study) {
    if (!(await this.report.save(study))) return; // nothing new in the study's series
    await this.studies.refresh(study).catch(() => {});
    if (this.active) this.strip.mark(this.active.study, this.active.series);
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
    if (pane === this.active) this.toolbar.showPreset("custom");
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
    document.getElementById("where").textContent = `${text(meta, "00100010")} · ${studyDay(meta)} · ${text(meta, "00081030")}`;
    document.title = `${text(meta, "00100010")} — minipacs`;
  }

  // -- what the toolbar and the keys set ------------------------------------------------------

  // The preset applies to the active pane, or in MPR to the three planes.
  applyPreset(value) {
    for (const pane of this.mpr ? this.mpr.panes : [this.active]) pane.applyPreset(value);
    this.toolbar.showPreset(value);
  }

  setFps(fps) {
    const pane = this.active;
    pane.fps = fps;
    if (pane.cine) pane.startCine();
  }

  setTool(name) {
    this.measurements.tool = name;
    for (const pane of this.grid.panes) pane.viewport.stage.classList.toggle("drawing", name !== "window");
  }

  // The overlays, the toolbar and the strip's counts of `study` say what is marked now.
  keyImagesChanged(study) {
    for (const pane of this.layout.visible) pane.viewport.updateOverlays();
    this.syncToolbar();
    this.strip.showKeyImages(study, this.report.keyImageCounts(study));
  }

  isKeyImage(sop) {
    return this.report.isKeyImage(sop);
  }

  // -- the layout, and MPR ----------------------------------------------------------------------

  // Layout `name` (1x1…2x2); the panes it adds open series (opener.js) unless `fill` is false.
  setLayout(name, { fill = true } = {}) {
    this.exitMpr();
    const added = this.layout.set(name);
    for (const pane of this.grid.panes) if (!this.grid.visible.includes(pane)) pane.stopCine();
    this.syncToolbar();
    if (fill) this.opener.fill(added.filter((pane) => !pane.series));
  }

  // The active pane's series as three planes, if the server says it is a volume (else its
  // reason, and nothing changes).
  async enterMpr() {
    const source = this.active;
    if (this.mpr || this.enteringMpr || !source.stack.length) return;
    this.enteringMpr = true;
    this.say("MPR: reading the volume…");
    let volume;
    try {
      volume = await readVolume(source, this.signal);
    } catch (error) {
      if (error.name !== "AbortError") this.say(`No MPR: ${error.message}`);
      return;
    } finally {
      this.enteringMpr = false;
      this.syncToolbar();
    }
    if (source !== this.active || this.mpr) return; // moved on meanwhile
    for (const pane of this.grid.panes) pane.stopCine();
    const mpr = new MprLayout((number, plane) => this.makePlanePane(number, plane), source, volume);
    this.mpr = mpr;
    this.layout = mpr;
    this.grid.node.replaceWith(mpr.node);
    this.activate(mpr.panes[0], { focus: true });
    mpr.goToCentreOf(source);
    this.say("MPR: a click (or Enter at the cursor, X) moves the crosshair; M leaves.");
    this.syncToolbar();
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
    this.say("");
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
