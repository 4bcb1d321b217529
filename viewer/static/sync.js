// What links panes through patient space: panes on the same Frame of Reference with
// parallel slices scroll together by slice position (the nearest slice along the
// normal, not the same index), and a pane shows where the other panes' slices cut it
// (reference lines) when they are not parallel to it: an axial slice's line on a
// localizer or a coronal or sagittal plane. Both need the geometry of a pane's slices
// (pane.geometry(index)); without it nothing is linked.

import { along, parallel, referenceLine } from "./orientation.js";

const SVG = "http://www.w3.org/2000/svg";

// Move the panes linked to `source` to the slice nearest to its own.
export function syncFrom(source, panes) {
  const here = source.geometry();
  if (!here || !here.plane || !here.frameOfReference) return;
  const normal = here.plane.normal;
  const position = along(here.plane, normal);
  for (const pane of panes) {
    if (pane === source || !pane.stack.length) continue;
    const there = pane.geometry();
    if (!there || !there.plane || there.frameOfReference !== here.frameOfReference) continue;
    if (!parallel(there.plane, here.plane)) continue;
    const nearest = nearestSlice(pane, normal, position);
    if (nearest !== null && nearest !== pane.index) pane.go(nearest, { synced: true });
  }
}

// The index of `pane`'s slice nearest to `position` along `normal` (null when the
// series' geometry is not in).
function nearestSlice(pane, normal, position) {
  let best = null;
  let distance = Infinity;
  for (let index = 0; index < pane.stack.length; index += 1) {
    const geometry = pane.geometry(index);
    if (!geometry || !geometry.plane) continue;
    const off = Math.abs(along(geometry.plane, normal) - position);
    if (off < distance) {
      distance = off;
      best = index;
    }
  }
  return best;
}

// A viewport layer drawing, on `pane`, the lines of the other panes' slices.
export class ReferenceLines {
  constructor(pane, others) {
    this.pane = pane;
    this.others = others; // () → the other panes on the page
    this.shown = true;
    this.group = document.createElementNS(SVG, "g");
    this.group.setAttribute("class", "reference-lines");
    pane.viewport.svg.append(this.group);
  }

  render(viewport) {
    const lines = this.shown ? this.lines() : [];
    this.group.replaceChildren(
      ...lines.map(([from, to, number]) => {
        const line = document.createElementNS(SVG, "line");
        const [x1, y1] = viewport.toScreen(from);
        const [x2, y2] = viewport.toScreen(to);
        for (const [name, value] of Object.entries({ x1, y1, x2, y2 })) line.setAttribute(name, String(value));
        line.setAttribute("data-from", String(number));
        return line;
      }),
    );
  }

  // [from, to, pane number] in this pane's image coordinates.
  lines() {
    const here = this.pane.geometry();
    if (!here || !here.plane || !here.frameOfReference || !this.pane.viewport.shown) return [];
    const found = [];
    for (const other of this.others()) {
      if (other === this.pane || !other.stack.length) continue;
      const there = other.geometry();
      if (!there || !there.plane || there.frameOfReference !== here.frameOfReference) continue;
      const segment = referenceLine(here, there);
      if (segment) found.push([...segment, other.number]);
    }
    return found;
  }
}
