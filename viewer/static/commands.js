// What each command of the study view does, on its own so that one table answers "what
// does this key or button do?": keys.js names the commands of the keys, the toolbar's
// buttons run the same names, and this table says what each does to the active pane or
// the view. The keyboard cursor's commands are here too (cursor.js is the cursor itself):
// the arrows move it, Enter places a point at it, g grabs a measurement's point for it.

import { ARROWS } from "./cursor.js";
import { presetValue } from "./toolbar.js";

export class Commands {
  // `view`: the study view (studyview.js) the commands act on.
  constructor(view) {
    this.view = view;
  }

  // Run `command`; `key` and `shift`: the key pressed, when one was. False: there is no
  // such command.
  run(command, key = "", shift = false) {
    const view = this.view;
    const pane = view.active;
    const viewport = pane.viewport;
    const arrow = view.cursor.on && ARROWS[key];
    const commands = {
      next: () => (arrow ? this.moveCursor(arrow, shift) : pane.go(pane.index + 1)),
      previous: () => (arrow ? this.moveCursor(arrow, shift) : pane.go(pane.index - 1)),
      window: () => (arrow ? this.moveCursor(arrow, shift) : pane.input.stepWindow(ARROWS[key])),
      forward10: () => pane.go(pane.index + 10),
      back10: () => pane.go(pane.index - 10),
      firstImage: () => pane.go(0),
      lastImage: () => pane.go(pane.stack.length - 1),
      nextSeries: () => view.opener.stepSeries(1),
      previousSeries: () => view.opener.stepSeries(-1),
      preset: () => {
        const value = presetValue(pane.modality, Number(key));
        if (value) view.applyPreset(value);
      },
      fileWindow: () => view.applyPreset("file"),
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
      nextLayout: () => (view.mpr ? view.exitMpr() : view.setLayout(view.layout.next())),
      mpr: () => (view.mpr ? view.exitMpr() : view.enterMpr()),
      keyImage: () => view.report.toggleKeyImage(pane),
      cursor: () => this.toggleCursor(),
      place: () => this.place(),
      grab: () => this.grab(key === "G" ? -1 : 1),
      nextPane: () => view.activate(view.layout.neighbour(1), { focus: focusOnViewports(view.layout) }),
      previousPane: () => view.activate(view.layout.neighbour(-1), { focus: focusOnViewports(view.layout) }),
      sync: () => view.toggleSync(),
      referenceLines: () => view.toggleReferenceLines(),
      overlays: () => view.toggleOverlays(),
      tags: () => view.toggleTags(),
      help: () => view.help.showModal(),
      toolWindow: () => view.setTool("window"),
      toolLength: () => view.setTool("length"),
      toolAngle: () => view.setTool("angle"),
      toolEllipse: () => view.setTool("ellipse"),
      toolRectangle: () => view.setTool("rectangle"),
      deleteMeasurement: () => view.measurements.remove(pane),
      escape: () => {
        view.measurements.escape();
        view.say("");
      },
      save: () => (view.report.canSave ? view.saveReport(pane.study) : view.say("This server does not save measurements.")),
    };
    const action = commands[command];
    if (!action) return false;
    action();
    return true;
  }

  // -- the keyboard cursor -----------------------------------------------------------------

  moveCursor(direction, shift) {
    const { active: pane, cursor, measurements } = this.view;
    if (!pane.stack.length) return;
    measurements.follow(pane, cursor.move(pane, direction, shift ? 10 : 1));
  }

  // Turned off, it lets go of a grabbed point where it is.
  toggleCursor() {
    const { cursor, measurements } = this.view;
    cursor.toggle(this.view.active);
    if (!cursor.on) measurements.release();
  }

  // Enter: a grabbed point stays where it is; else at the cursor (turned on first when
  // it is off), the tool's next point, or in MPR the crosshair.
  place() {
    const view = this.view;
    const pane = view.active;
    if (view.measurements.release()) {
      view.say("");
      return;
    }
    if (!pane.stack.length || !pane.viewport.shown) return;
    if (!view.cursor.on) {
      view.cursor.toggle(pane);
      return;
    }
    const point = view.cursor.at(pane);
    if (pane.plane) view.crosshair(pane, point);
    else if (!view.measurements.place(pane, point)) view.say("Choose a tool (D, A, E or B) to place points with Enter.");
  }

  // g: the next point of a measurement on the image (G: the previous) for the cursor,
  // turned on there, to move; Enter leaves it, Esc puts it back.
  grab(step) {
    const view = this.view;
    const pane = view.active;
    if (pane.plane || !pane.viewport.shown) return;
    if (view.measurements.keyed || view.measurements.placing) {
      view.say("Finish the measurement being drawn first (Enter), or drop it (Esc).");
      return;
    }
    const point = view.measurements.grab(pane, step);
    if (!point) {
      view.say("No measurement on this image.");
      return;
    }
    view.cursor.moveTo(pane, point);
    view.say("Arrows move the point (Shift: ten pixels); Enter leaves it there, Esc puts it back.");
  }
}

// Whether the focus is on a viewport of `layout` (or nowhere): ] and [ take it along to
// the next one; from the strip they leave it there, so that Enter on a series opens it in
// the viewport chosen, the keyboard's way to drop a series on a viewport.
function focusOnViewports(layout) {
  const focused = document.activeElement;
  return !focused || focused === document.body || layout.node.contains(focused);
}
