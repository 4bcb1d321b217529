// The study view's keys: one table says which key does what, and the key handler, the
// "?" help and the toolbar's titles are made from it, so none can drift from the keys. Keys act on
// the active pane; they are ignored while typing in a field, and with Alt, or Ctrl or
// Meta (the browser's own shortcuts) unless the table names them ("Ctrl+s").

import { button, el } from "./dom.js";

// [keys (keyName's names), shown as, what it does, command of the study view (commands.js)]
export const KEYS = [
  [["ArrowDown", "ArrowRight"], "↓ →", "Next image (the cursor on: move it)", "next"],
  [["ArrowUp", "ArrowLeft"], "↑ ←", "Previous image (the cursor on: move it)", "previous"],
  [["Shift+ArrowLeft", "Shift+ArrowRight"], "Shift+← →", "Window narrower, wider, as a drag (the cursor on: move it ten)", "window"],
  [["Shift+ArrowUp", "Shift+ArrowDown"], "Shift+↑ ↓", "Window centre lower, higher: brighter, darker (the cursor on: move it ten)", "window"],
  [["PageDown"], "PgDn", "10 images on", "forward10"],
  [["PageUp"], "PgUp", "10 images back", "back10"],
  [["Home"], "Home", "First image", "firstImage"],
  [["End"], "End", "Last image", "lastImage"],
  [["n"], "N", "Next series", "nextSeries"],
  [["p"], "P", "Previous series", "previousSeries"],
  [["1", "2", "3", "4", "5"], "1 – 5", "Window presets of the modality", "preset"],
  [["0"], "0", "The file's window", "fileWindow"],
  [["i"], "I", "Invert", "invert"],
  [["c"], "C", "Cine on or off", "cine"],
  [["f"], "F", "Fit to the viewport", "fit"],
  [["z"], "Z", "Actual size (1:1)", "actualSize"],
  [["+", "="], "+", "Zoom in", "zoomIn"],
  [["-"], "−", "Zoom out", "zoomOut"],
  [["r"], "R", "Rotate 90° clockwise", "rotateRight"],
  [["R"], "Shift+R", "Rotate 90° anticlockwise", "rotateLeft"],
  [["h"], "H", "Flip left–right", "flipH"],
  [["v"], "V", "Flip top–bottom", "flipV"],
  [[" "], "Space", "Reset window, zoom, rotation, flips and invert", "reset"],
  [["l"], "L", "Next layout (1×1, 1×2, 2×1, 2×2)", "nextLayout"],
  [["]"], "]", "Next viewport", "nextPane"],
  [["["], "[", "Previous viewport", "previousPane"],
  [["s"], "S", "Scroll linked viewports together, or not", "sync"],
  [["y"], "Y", "Reference lines on or off", "referenceLines"],
  [["m"], "M", "MPR: axial, coronal and sagittal planes of the volume, or back", "mpr"],
  [["d"], "D", "Length tool", "toolLength"],
  [["a"], "A", "Angle tool", "toolAngle"],
  [["e"], "E", "Ellipse ROI tool", "toolEllipse"],
  [["b"], "B", "Rectangle ROI tool", "toolRectangle"],
  [["w"], "W", "Window tool (drag sets the window)", "toolWindow"],
  [["x"], "X", "Keyboard cursor on or off", "cursor"],
  [["Enter"], "Enter", "At the cursor: the tool's next point, or the MPR crosshair; leave a grabbed point", "place"],
  [["g", "G"], "G", "Grab the next point of a measurement on the image for the cursor (Shift: previous)", "grab"],
  [["k"], "K", "Mark or unmark the image as a key image", "keyImage"],
  [["Delete", "Backspace"], "Del", "Delete the selected measurement", "deleteMeasurement"],
  [["Escape"], "Esc", "Stop drawing; put a grabbed point back; close this help", "escape"],
  [["Ctrl+s"], "Ctrl+S", "Save the study's measurements and key images", "save"],
  [["o"], "O", "Overlays on or off", "overlays"],
  [["t"], "T", "Tag panel", "tags"],
  [["?"], "?", "This help", "help"],
];

// The key that runs study view command `command` as the help shows it ("C", "Shift+R"),
// for the toolbar's titles; undefined when no key runs it.
export function keyOf(command) {
  const row = KEYS.find(([, , , named]) => named === command);
  return row && row[1];
}

// Keys a focused panel that scrolls (marked data-scrolls, the tag panel) keeps.
const SCROLLING = new Set(["ArrowDown", "ArrowUp", "ArrowLeft", "ArrowRight", "PageDown", "PageUp", "Home", "End", " "]);

// A key press's name in KEYS: its KeyboardEvent.key, after "Ctrl+" (Ctrl or Meta) and,
// for a key that is not a character, "Shift+" (a character has its Shift in it: "R").
export function keyName(event) {
  const shift = event.shiftKey && event.key.length > 1 ? "Shift+" : "";
  return `${event.ctrlKey || event.metaKey ? "Ctrl+" : ""}${shift}${event.key}`;
}

// The command for a key press, or null. A Shift+ name the table does not have is the
// key's own ("Shift+Enter" is Enter); a Ctrl+ one is the browser's.
export function commandFor(event) {
  if (event.altKey) return null;
  const target = event.target.closest ? event.target : null;
  if (target && target.closest("input, select, textarea, dialog[open]")) return null; // a closed one may keep the focus
  if (target && (event.key === " " || event.key === "Enter") && target.closest("button, a")) return null; // their own click
  if (target && SCROLLING.has(event.key) && target.closest("[data-scrolls]")) return null;
  const find = (name) => KEYS.find(([keys]) => keys.includes(name));
  const found = find(keyName(event)) || (event.ctrlKey || event.metaKey ? null : find(event.key));
  return found ? found[3] : null;
}

// The "?" dialog listing the keys in two columns (a modal <dialog>: Escape and its
// button close it).
export function helpDialog() {
  const row = ([, shown, does]) => el("tr", {}, el("th", { scope: "row" }, el("kbd", {}, shown)), el("td", {}, does));
  const half = Math.ceil(KEYS.length / 2);
  const table = (rows) => el("table", {}, el("tbody", {}, ...rows.map(row)));
  const dialog = el("dialog", { class: "keys-help", "aria-label": "Keyboard shortcuts" });
  dialog.append(
    el("div", { class: "head" }, el("h2", {}, "Keys"), button("Close", () => dialog.close(), { class: "close" })),
    el("div", { class: "columns" }, table(KEYS.slice(0, half)), table(KEYS.slice(half))),
    el(
      "p",
      {},
      "Tab reaches every control. Enter on a series opens it in the active viewport; ] and [ choose that viewport and leave the focus on the series.",
    ),
  );
  return dialog;
}
