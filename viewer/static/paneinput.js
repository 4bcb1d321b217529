// A pane's wheel, drags and window keys, turned into what they do to it: the wheel scrolls
// its stack (with Ctrl, zooms); a drag windows, pans (middle button, or Shift) or zooms
// (right button), unless the study view's tool takes the press (`host.drag`); the window
// keys (Shift+arrows) move the window as a drag would. While the window moves, frames are
// rendered as JPEGs, one in flight (the latest window wins), and the exact PNG once the
// drag ends or the keys rest. The pane keeps the state the stack loader and the toolbar
// read (`window`, `preset`, `dragging`); this sets it.

const WIDTH_STEP = 1.1; // a window key widens or narrows the window by a tenth
const CENTRE_STEP = 1 / 20; // or moves its centre by a twentieth of the width
const KEYS_REST = 300; // ms without a window key after which the exact PNG is asked for

export class PaneInput {
  constructor(pane) {
    this.pane = pane;
    this.closing = new AbortController(); // a pane closed before the view (MPR's) lets go of its listeners
    const signal = AbortSignal.any([pane.host.signal, this.closing.signal]);
    const stage = pane.viewport.stage;
    this.wheeled = 0; // a touchpad's small deltas, added up
    stage.addEventListener("wheel", (event) => this.wheel(event), { passive: false, signal });
    stage.addEventListener("pointerdown", (event) => pane.startDrag(event), { signal });
    stage.addEventListener("focus", () => pane.host.activate(pane), { signal });
    stage.addEventListener("contextmenu", (event) => event.preventDefault(), { signal });
  }

  wheel(event) {
    const pane = this.pane;
    event.preventDefault();
    pane.host.activate(pane);
    if (event.ctrlKey) {
      pane.viewport.setZoom(pane.viewport.zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
      return;
    }
    // A mouse notch (|delta| ≥ 50 px, or lines) is one slice; a touchpad's small
    // deltas add up to one slice per 100 px.
    const delta = event.deltaY * (event.deltaMode === 1 ? 40 : 1);
    if (Math.abs(delta) >= 50) {
      // A busy browser merges queued notches into one event (deltaY 200, 300…).
      this.wheeled = 0;
      pane.go(pane.index + Math.sign(delta) * Math.max(1, Math.round(Math.abs(delta) / 100)));
      return;
    }
    this.wheeled += delta;
    if (Math.abs(this.wheeled) >= 100) {
      pane.go(pane.index + Math.sign(this.wheeled));
      this.wheeled = 0;
    }
  }

  // A press on the pane's stage (through `pane.startDrag`, which MPR's planes extend).
  drag(event) {
    const pane = this.pane;
    pane.host.activate(pane);
    if (!pane.stack.length) return;
    const viewport = pane.viewport;
    const stage = viewport.stage;
    stage.focus();
    clearTimeout(this.windowKeys);
    if (event.button === 0 && !event.shiftKey && pane.host.drag(pane, event)) return;
    stage.setPointerCapture(event.pointerId);
    const start = [event.clientX, event.clientY];
    const pan = [...viewport.pan];
    const mode = event.button === 1 || event.shiftKey ? "pan" : event.button === 2 ? "zoom" : "window";
    const zoom = viewport.zoom;
    const window = pane.startWindow();
    const move = (moved) => {
      const dx = moved.clientX - start[0];
      const dy = moved.clientY - start[1];
      if (mode === "pan") viewport.panTo([pan[0] + dx, pan[1] + dy]);
      else if (mode === "zoom") viewport.setZoom(zoom * Math.exp(-dy / 200));
      else if (Math.abs(dx) + Math.abs(dy) > 1) {
        const step = Math.max(1, window.width / 256);
        this.dragWindow({ center: window.center + dy * step, width: Math.max(1, window.width + dx * step) });
      }
    };
    const up = () => {
      stage.removeEventListener("pointermove", move);
      stage.removeEventListener("pointerup", up);
      stage.removeEventListener("pointercancel", up);
      this.endDragWindow();
    };
    stage.addEventListener("pointermove", move);
    stage.addEventListener("pointerup", up);
    stage.addEventListener("pointercancel", up);
  }

  // A window key (Shift+arrows) moves the window as a drag in screen direction
  // `[wider, higher]` would: wider or narrower by a tenth, the centre up or down by a
  // twentieth of the width. Keys pressed or held in a row are one drag; the exact PNG
  // comes once they rest.
  stepWindow([wider, higher]) {
    if (!this.pane.stack.length) return;
    const { center, width } = this.pane.startWindow();
    this.dragWindow({ center: center + higher * width * CENTRE_STEP, width: Math.max(1, width * WIDTH_STEP ** wider) });
    clearTimeout(this.windowKeys);
    this.windowKeys = setTimeout(() => this.endDragWindow(), KEYS_REST);
  }

  // A window set by a drag, or by window keys pressed in a row: rendered as a drag's,
  // a JPEG at a time.
  dragWindow(window) {
    const pane = this.pane;
    pane.window = window;
    pane.preset = "custom";
    pane.host.windowChanged(pane);
    pane.dragging = true;
    this.dragRender();
  }

  // The drag is over: the exact PNG, and the neighbours in the new window.
  endDragWindow() {
    const pane = this.pane;
    if (!pane.dragging) return;
    pane.dragging = false;
    pane.loader.request(pane.index, "png", { current: true });
    pane.loader.prefetch();
  }

  // While dragging: one JPEG in flight; when it lands, ask for the latest window.
  dragRender() {
    const pane = this.pane;
    pane.viewport.updateOverlays();
    if (this.inFlight) {
      this.pending = true;
      return;
    }
    this.inFlight = true;
    this.pending = false;
    pane.loader.abort((key) => !key.endsWith("|jpeg"));
    pane.loader
      .request(pane.index, "jpeg", { current: true, quality: 70 })
      .catch(() => {})
      .finally(() => {
        this.inFlight = false;
        if (this.pending && pane.dragging) this.dragRender();
      });
  }

  close() {
    this.closing.abort();
    clearTimeout(this.windowKeys);
  }
}
