// The tag panel: the current instance's DICOM JSON (from its /metadata) as a table, with
// sequence items indented (three levels deep) and the keyword of each tag. Tab reaches
// it, and then the arrows and Page keys scroll it (data-scrolls: keys.js leaves them).

import { text } from "./dicomweb.js";
import { el } from "./dom.js";

const DEPTH = 3; // sequence levels shown
const LONGEST = 200; // characters of a value shown

export class TagPanel {
  constructor() {
    this.node = el("aside", { class: "tags", "aria-label": "DICOM tags", tabindex: "0", "data-scrolls": "", hidden: "" });
  }

  get open() {
    return !this.node.hidden;
  }

  toggle() {
    this.node.hidden = !this.node.hidden;
  }

  // Show `meta` (undefined while it loads); nothing to do while the panel is closed.
  async render(meta) {
    if (this.node.hidden) return;
    if (!meta) {
      this.node.replaceChildren(el("p", { class: "state" }, "Loading tags…"));
      return;
    }
    const names = await keywords();
    const rows = [];
    addRows(rows, meta, names, 0);
    const head = el("tr", {}, ...["Tag", "Name", "VR", "Value"].map((label) => el("th", { scope: "col" }, label)));
    this.node.replaceChildren(
      el("h2", {}, "Tags"),
      el("table", { class: "tag-table" }, el("thead", {}, head), el("tbody", {}, ...rows)),
    );
  }
}

// Tag → keyword, fetched once for every view (null until asked for).
let keywordTable = null;
function keywords() {
  keywordTable ??= fetch("/ui/keywords.json").then((r) => (r.ok ? r.json() : {}), () => ({}));
  return keywordTable;
}

function addRows(rows, dataset, names, depth) {
  for (const tag of Object.keys(dataset).sort()) {
    const element = dataset[tag];
    const label = `(${tag.slice(0, 4)},${tag.slice(4)})`;
    const value = shown(dataset, tag, element);
    rows.push(
      el(
        "tr",
        { "data-tag": tag },
        el("td", { class: "tag" }, "  ".repeat(depth) + label),
        el("td", {}, names[tag] || ""),
        el("td", {}, element.vr || ""),
        el("td", { class: "value" }, value.length > LONGEST ? value.slice(0, LONGEST) + "…" : value),
      ),
    );
    if (element.vr === "SQ" && depth < DEPTH) {
      for (const item of element.Value || []) addRows(rows, item, names, depth + 1);
    }
  }
}

function shown(dataset, tag, element) {
  if (element.vr === "SQ") return `${(element.Value || []).length} item(s)`;
  if (element.BulkDataURI) return "(bulk data)";
  if (element.InlineBinary) return "(binary)";
  return text(dataset, tag);
}
