// The study view's toolbar, on its own so that the view keeps only the wiring: the
// buttons and selects (each button runs a study view command by the name the keys use,
// keys.js), the status line where commands answer, and `show`, which sets what is
// pressed, the window presets and the download links from the active pane. The window
// presets of each modality live here: the Window select lists them and the 1–5 keys pick
// them (`presetValue`).

import { button, el } from "./dom.js";
import { keyOf } from "./keys.js";
import { LAYOUTS } from "./layout.js";
import { TOOLS } from "./measure.js";

const PRESETS = {
  CT: [
    ["Brain", 40, 80],
    ["Lung", -600, 1500],
    ["Bone", 400, 1800],
    ["Abdomen", 60, 400],
    ["Soft tissue", 50, 350],
  ],
};

// Preset `number` (from 1) of `modality` as a pane's preset value ("center,width"), or
// null when the modality has no such preset.
export function presetValue(modality, number) {
  const preset = (PRESETS[modality] || [])[number - 1];
  return preset ? `${preset[1]},${preset[2]}` : null;
}

export class Toolbar {
  // `run(command)`: a button's command; `setLayout(name)`, `applyPreset(value)` and
  // `setFps(fps)`: the Layout and Window selects and the fps field were changed.
  constructor({ run, setLayout, applyPreset, setFps }) {
    this.layoutSelect = el("select", { "aria-label": "Layout", class: "layout" });
    this.layoutSelect.append(...LAYOUTS.map(([name, label]) => el("option", { value: name }, label)), el("option", { value: "mpr" }, "MPR"));
    this.layoutSelect.addEventListener("change", () => {
      if (this.layoutSelect.value === "mpr") run("mpr");
      else setLayout(this.layoutSelect.value);
    });
    this.presetSelect = el("select", { "aria-label": "Window preset", class: "preset" });
    this.presetSelect.addEventListener("change", () => applyPreset(this.presetSelect.value));
    this.fpsInput = el("input", { type: "number", min: "1", max: "60", value: "10", "aria-label": "Frames per second", class: "fps" });
    this.fpsInput.addEventListener("change", () => setFps(Math.min(60, Math.max(1, Number(this.fpsInput.value) || 10))));
    // A button runs a command by its name in the key table, and its title ends with the
    // key that runs it too, from that table.
    const tool = (label, command, { title, ...attributes }) => {
      const key = keyOf(command);
      return button(label, () => run(command), { ...attributes, title: key ? `${title} (${key})` : title });
    };
    this.playButton = tool("▶ Cine", "cine", { "aria-pressed": "false", class: "cine", title: "Cine" });
    this.invertButton = tool("Invert", "invert", { "aria-pressed": "false", title: "Invert" });
    this.syncButton = tool("Sync", "sync", { "aria-pressed": "true", title: "Viewports on one frame of reference scroll together" });
    this.linesButton = tool("Ref lines", "referenceLines", { "aria-pressed": "true", title: "Reference lines" });
    this.overlayButton = tool("Overlays", "overlays", { "aria-pressed": "true", title: "Overlays" });
    this.tagButton = tool("Tags", "tags", { "aria-pressed": "false", title: "Tag panel" });
    this.download = el("a", { class: "download", download: "" }, "Download");
    this.seriesZip = el("a", { class: "download", download: "", title: "The series' files and a DICOMDIR" }, "Series ZIP");
    const labels = { window: "W/L", length: "Length", angle: "Angle", ellipse: "Ellipse", rectangle: "Rectangle" };
    this.toolButtons = ["window", ...TOOLS].map((name) => {
      const label = labels[name];
      const title = name === "window" ? "Dragging sets the window" : `Draw: ${name}`;
      return tool(label, `tool${name[0].toUpperCase()}${name.slice(1)}`, { "aria-pressed": String(name === "window"), "data-tool": name, title });
    });
    this.mprButton = tool("MPR", "mpr", { "aria-pressed": "false", title: "Axial, coronal and sagittal planes of a volume, or back" });
    this.keyButton = tool("★ Key", "keyImage", { "aria-pressed": "false", "aria-label": "Key image", title: "Mark or unmark the image as a key image" });
    this.cursorButton = tool("Cursor", "cursor", { "aria-pressed": "false", title: "Keyboard cursor: arrows move it, Enter places a point" });
    this.saveButton = tool("Save", "save", { hidden: "", title: "Save the study's measurements and key images as DICOM, an SR and a KOS" });
    this.status = el("output", { class: "status", "aria-live": "polite" });
    this.node = el(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Image tools" },
      el("label", {}, "Layout ", this.layoutSelect),
      el("label", {}, "Window ", this.presetSelect),
      this.invertButton,
      tool("Fit", "fit", { title: "Fit" }),
      tool("1:1", "actualSize", { title: "Actual size" }),
      tool("−", "zoomOut", { "aria-label": "Zoom out", title: "Zoom out" }),
      tool("+", "zoomIn", { "aria-label": "Zoom in", title: "Zoom in" }),
      tool("⟲", "rotateLeft", { "aria-label": "Rotate left", title: "Rotate 90° anticlockwise" }),
      tool("⟳", "rotateRight", { "aria-label": "Rotate right", title: "Rotate 90° clockwise" }),
      tool("⇆", "flipH", { "aria-label": "Flip horizontally", title: "Flip left–right" }),
      tool("⇅", "flipV", { "aria-label": "Flip vertically", title: "Flip top–bottom" }),
      tool("Reset", "reset", { title: "Reset" }),
      this.playButton,
      el("label", {}, "fps ", this.fpsInput),
      this.syncButton,
      this.linesButton,
      this.overlayButton,
      this.tagButton,
      tool("?", "help", { "aria-label": "Keys", title: "Keys" }),
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
  }

  // The status line (a polite live region): what a command did, or why it did nothing.
  say(message) {
    this.status.value = message;
  }

  // The toolbar as active pane `pane` has it; `state`, what the study view has on:
  // { layout (its name), mpr, syncing, overlays, tags, tool, keyImage, cursor, canSave }.
  show(pane, state) {
    this.layoutSelect.value = state.layout;
    this.showPresets(pane);
    this.invertButton.setAttribute("aria-pressed", String(pane.viewport.invert));
    this.playButton.textContent = pane.cine ? "❚❚ Stop" : "▶ Cine";
    this.playButton.setAttribute("aria-pressed", String(Boolean(pane.cine)));
    this.fpsInput.value = String(pane.fps);
    this.syncButton.setAttribute("aria-pressed", String(state.syncing));
    this.linesButton.setAttribute("aria-pressed", String(pane.references.shown));
    this.overlayButton.setAttribute("aria-pressed", String(state.overlays));
    this.tagButton.setAttribute("aria-pressed", String(state.tags));
    for (const node of this.toolButtons) node.setAttribute("aria-pressed", String(node.dataset.tool === state.tool));
    this.mprButton.setAttribute("aria-pressed", String(state.mpr));
    this.keyButton.setAttribute("aria-pressed", String(state.keyImage));
    this.cursorButton.setAttribute("aria-pressed", String(state.cursor));
    this.saveButton.hidden = !state.canSave;
    const slice = pane.stack[pane.index];
    this.seriesZip.href = pane.series ? `/studies/${pane.study}/series/${pane.series}/archive` : "";
    this.download.href = slice && !pane.plane
      ? `/wado?requestType=WADO&studyUID=${pane.study}&seriesUID=${pane.series}&objectUID=${slice.sop}&contentType=application%2Fdicom&transferSyntax=*`
      : "";
  }

  // The Window select: the presets of the pane's modality, showing the pane's.
  showPresets(pane) {
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

  // The Window select says `value` (a preset applied, or "custom": dragged or keyed).
  showPreset(value) {
    this.presetSelect.value = value;
  }
}
