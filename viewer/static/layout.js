// The layout: 1×1, 1×2, 2×1 or 2×2 panes (rows × columns) in a grid, which of them is
// active (the toolbar, the keys and the strip's links act on it), and series dropped on
// a pane from the strip. Panes beyond the layout are kept, off the page, with what they
// showed, and come back when the layout grows again.

import { el } from "./dom.js";

export const LAYOUTS = [
  ["1x1", "1×1", 1, 1],
  ["1x2", "1×2", 1, 2],
  ["2x1", "2×1", 2, 1],
  ["2x2", "2×2", 2, 2],
];
export const SERIES_TYPE = "application/x-minipacs-series"; // a dragged strip item: {study, series}

// What every arrangement of panes does with its `panes` and `visible` ones: one of them
// is active, and the keyboard moves on to its neighbours.
export class Panes {
  activate(pane) {
    if (!pane || pane === this.active) return false;
    this.active = pane;
    for (const each of this.panes) each.node.classList.toggle("active", each === pane);
    return true;
  }

  // The visible pane `step` places after the active one (wrapping).
  neighbour(step) {
    const shown = this.visible;
    const at = shown.indexOf(this.active);
    return shown[(at + step + shown.length) % shown.length];
  }
}

export class Layout extends Panes {
  // `makePane(number)` makes pane `number` (from 1); `dropped(pane, study, series)` is
  // called when a strip item is dropped on it.
  constructor(makePane, dropped, signal) {
    super();
    this.makePane = makePane;
    this.dropped = dropped;
    this.signal = signal;
    this.panes = [];
    this.name = "";
    this.active = null;
    this.node = el("div", { class: "grid" });
    this.set("1x1");
    this.activate(this.panes[0]);
  }

  // The panes on the page.
  get visible() {
    const [, , rows, columns] = LAYOUTS.find(([name]) => name === this.name);
    return this.panes.slice(0, rows * columns);
  }

  // Show layout `name`; return the panes it adds to the page.
  set(name) {
    const layout = LAYOUTS.find(([known]) => known === name);
    if (!layout || name === this.name) return [];
    const before = this.name ? this.visible : [];
    const [, , rows, columns] = layout;
    while (this.panes.length < rows * columns) this.panes.push(this.accept(this.makePane(this.panes.length + 1)));
    this.name = name;
    this.node.dataset.layout = name;
    const shown = this.visible;
    this.node.replaceChildren(...shown.map((pane) => pane.node));
    if (this.active && !shown.includes(this.active)) this.activate(shown[0]);
    return shown.filter((pane) => !before.includes(pane));
  }

  // The next layout after this one (the layout key cycles).
  next() {
    const at = LAYOUTS.findIndex(([name]) => name === this.name);
    return LAYOUTS[(at + 1) % LAYOUTS.length][0];
  }


  // A pane takes strip items dropped on it.
  accept(pane) {
    const node = pane.node;
    const signal = this.signal;
    node.addEventListener(
      "dragover",
      (event) => {
        if (!event.dataTransfer.types.includes(SERIES_TYPE)) return;
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
        node.classList.add("drop");
      },
      { signal },
    );
    node.addEventListener("dragleave", () => node.classList.remove("drop"), { signal });
    node.addEventListener(
      "drop",
      (event) => {
        node.classList.remove("drop");
        const data = event.dataTransfer.getData(SERIES_TYPE);
        if (!data) return;
        event.preventDefault();
        const { study, series } = JSON.parse(data);
        this.dropped(pane, study, series);
      },
      { signal },
    );
    return pane;
  }
}
