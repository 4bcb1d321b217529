// The keyboard cursor, so that every tool works without a pointer: a point on the active
// pane's image that the arrow keys move (one image pixel, ten with Shift) in the
// directions they point on the screen, whatever the view's turns and flips. Enter acts
// there: a measurement tool places its next point, a grabbed measurement point stays,
// MPR moves its crosshair (the study view decides). It is drawn on an SVG layer in image coordinates, like the
// measurements, so it follows zoom and pan; and the view follows it, panning when it
// nears an edge, which is how a zoomed image is panned without a pointer.

const SVG = "http://www.w3.org/2000/svg";
const ARM = 9; // CSS pixels of each arm of the drawn cross
const MARGIN = 40; // CSS pixels from the viewport's edge the cursor is kept

export class Cursor {
  // `changed()`: it was turned on or off, or moved.
  constructor(changed) {
    this.changed = changed;
    this.on = false;
    this.pane = null;
    this.point = null; // image coordinates on `pane`
  }

  // Where it is on `pane`: the image's centre when it was on another pane or image, or
  // had none.
  at(pane) {
    const { columns, rows } = pane.viewport.imageSize();
    const inside = this.point && this.point[0] <= columns && this.point[1] <= rows;
    if (this.pane !== pane || !inside) {
      this.pane = pane;
      this.point = [columns / 2, rows / 2];
    }
    return this.point;
  }

  toggle(pane) {
    this.on = !this.on;
    if (this.on) this.at(pane);
    this.changed();
  }

  // Turn it on at image point `point` of `pane` (a measurement point grabbed), in sight.
  moveTo(pane, point) {
    this.on = true;
    this.pane = pane;
    this.point = [...point];
    keepInView(pane.viewport, this.point);
    this.changed();
  }

  // Move it `size` image pixels in screen direction `[sx, sy]` (each −1, 0 or 1), inside
  // the image. The view's matrix is a signed permutation: its inverse is its transpose.
  move(pane, [sx, sy], size) {
    const [x, y] = this.at(pane);
    const [a, b, c, d] = pane.viewport.orient;
    const { columns, rows } = pane.viewport.imageSize();
    const clamp = (value, high) => Math.min(high, Math.max(0, value));
    this.point = [clamp(x + (a * sx + c * sy) * size, columns), clamp(y + (b * sx + d * sy) * size, rows)];
    keepInView(pane.viewport, this.point);
    this.changed();
    return this.point;
  }
}

// Pan `viewport` so that image point `point` is at least MARGIN inside its edges.
function keepInView(viewport, point) {
  const [x, y] = viewport.toScreen(point);
  const { width, height } = viewport.stage.getBoundingClientRect();
  const margin = Math.min(MARGIN, width / 4, height / 4);
  const shift = (at, size) => (at < margin ? margin - at : at > size - margin ? size - margin - at : 0);
  const [dx, dy] = [shift(x, width), shift(y, height)];
  if (dx || dy) viewport.panTo([viewport.pan[0] + dx, viewport.pan[1] + dy]);
}

// The screen direction of each arrow key.
export const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

// A viewport layer drawing the cursor on `pane` while it is on there.
export class CursorLayer {
  constructor(cursor, pane) {
    this.cursor = cursor;
    this.pane = pane;
    this.group = document.createElementNS(SVG, "g");
    this.group.setAttribute("class", "keyboard-cursor");
    pane.viewport.svg.append(this.group);
  }

  render(viewport) {
    const { cursor } = this;
    if (!cursor.on || cursor.pane !== this.pane || !viewport.shown) {
      this.group.replaceChildren();
      return;
    }
    const [x, y] = viewport.toScreen(cursor.point);
    const line = (x1, y1, x2, y2) => {
      const node = document.createElementNS(SVG, "line");
      for (const [name, value] of Object.entries({ x1, y1, x2, y2 })) node.setAttribute(name, String(value));
      return node;
    };
    this.group.replaceChildren(line(x - ARM, y, x + ARM, y), line(x, y - ARM, x, y + ARM));
  }
}
