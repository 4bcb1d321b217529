// The stack loader: rendered frames of the open series fetched as ImageBitmaps, kept in
// a bounded cache, the current slice asked for one request at a time while it scrolls,
// neighbours prefetched in the scroll direction, and requests no longer useful aborted. It asks the view what is current (`isCurrent`, `exactShown`) and hands
// it what to draw (`draw`).

import { fetchBitmap, renderedURL } from "./dicomweb.js";

const PREFETCH = 10; // slices ahead in the scroll direction (and half of it behind)
const PARALLEL = 4; // rendered requests in flight (waitress serves 8 at once)
const CACHE = 160; // bitmaps kept
const MAX_SIDE = 2048; // larger images are rendered down to this on the server

export class StackLoader {
  constructor(view) {
    this.view = view; // study, series, stack, index, direction, window, dragging
    this.ahead = PREFETCH; // slices prefetched ahead (half of it behind)
    this.parallel = PARALLEL; // requests in flight
    this.bitmaps = new Map(); // key → ImageBitmap (insertion order = age)
    this.loading = new Map(); // key → { controller, current, promise }
  }

  // One rendering of one frame: series, instance, frame, window and format.
  key(index, format) {
    return this.keyOf(this.view.stack[index], format);
  }

  keyOf(slice, format) {
    const { series, window } = this.view;
    const windowed = window === null ? "file" : window === "auto" ? "auto" : `${window.center},${window.width}`;
    return `${series}|${slice.sop}|${slice.frame}|${windowed}|${format}`;
  }

  url(index, format, quality) {
    return this.urlOf(this.view.stack[index], format, quality);
  }

  urlOf(slice, format, quality) {
    const { study, series, window } = this.view;
    const big = Math.max(slice.rows, slice.columns) > MAX_SIDE;
    const scale = big ? MAX_SIDE / Math.max(slice.rows, slice.columns) : 1;
    const viewport = big ? [Math.round(slice.columns * scale), Math.round(slice.rows * scale)] : null;
    return renderedURL(study, series, slice.sop, slice.frame, { window, format, quality, viewport });
  }

  // Ask for frame `index`; the current one is drawn when it arrives.
  request(index, format, { current = false, quality = 90 } = {}) {
    const view = this.view;
    const key = this.key(index, format);
    const cached = this.bitmaps.get(key);
    if (cached) {
      this.bitmaps.delete(key); // refresh its age
      this.bitmaps.set(key, cached);
      if (current) view.draw(key, cached);
      return Promise.resolve(cached);
    }
    if (current) this.placeholder(index);
    const pending = this.loading.get(key);
    if (pending) {
      pending.current ||= current; // the request that loads it draws it: once
      return pending.promise;
    }
    return this.load(key, this.url(index, format, quality), current);
  }

  // The view's current slice, as it scrolls faster than the server renders: one request
  // for "the current slice" in flight; when it lands, the slice current by then is asked
  // for. Frames are dropped, the picture keeps moving, and the server renders nothing
  // nobody will see. `currentLoad`: that request, while it is in flight.
  showCurrent() {
    const index = this.view.index;
    const key = this.key(index, "png");
    if (this.bitmaps.has(key) || this.loading.has(key) || !this.currentLoad) {
      this.currentLoad = this.request(index, "png", { current: true })
        .catch(() => {})
        .finally(() => {
          this.currentLoad = null;
          if (this.currentStale) {
            this.currentStale = false;
            this.showCurrent();
          }
        });
      return;
    }
    this.currentStale = true;
    this.placeholder(index);
  }

  // Fetch `slice`'s PNG before the stack is known (a series' likely first slice): the
  // request for it, once it is current, finds it in flight or in the cache.
  warm(slice) {
    const key = this.keyOf(slice, "png");
    if (!this.bitmaps.has(key) && !this.loading.has(key)) this.load(key, this.urlOf(slice, "png", 90), false);
  }

  load(key, url, current) {
    const view = this.view;
    const entry = { controller: new AbortController(), current, promise: null };
    entry.promise = fetchBitmap(url, entry.controller.signal).then(
      (bitmap) => {
        this.loading.delete(key);
        this.remember(key, bitmap);
        if (view.isCurrent(key)) view.draw(key, bitmap);
        else if (entry.current && !view.exactShown()) view.draw(null, bitmap); // moved on: show it meanwhile
        this.prefetch();
        return bitmap;
      },
      (error) => {
        this.loading.delete(key);
        if (error.name === "AbortError") throw error;
        if (view.isCurrent(key)) view.viewport.showMessage(`Cannot display this image: ${error.message}`);
        // The neighbours wait for the first image (prefetch), not for it to succeed: one
        // that failed must not leave them unasked until the next scroll. Only a current
        // image's failure asks: a neighbour's would ask for that neighbour again.
        if (entry.current) this.prefetch();
        throw error;
      },
    );
    entry.promise.catch(() => {});
    this.loading.set(key, entry);
    return entry.promise;
  }

  // Keep the slice's nearest rendering on screen while the exact one loads.
  placeholder(index) {
    const { series, stack } = this.view;
    const slice = stack[index];
    const prefix = `${series}|${slice.sop}|${slice.frame}|`;
    for (const [key, bitmap] of [...this.bitmaps].reverse()) {
      if (key.startsWith(prefix)) {
        this.view.draw(null, bitmap);
        return;
      }
    }
  }

  prefetch() {
    const { stack, index, direction, dragging } = this.view;
    if (!stack.length || dragging) return;
    // A series' first image is asked for alone: neighbours asked beside it shared the
    // server's cores with it. They follow as soon as it is drawn or has failed (load); a
    // guess at it (`warm`) that was wrong goes.
    if (!this.view.viewport.shown && this.loading.has(this.key(index, "png"))) {
      this.abort((key, entry) => !entry.current);
      return;
    }
    const wanted = [];
    for (let step = 1; step <= this.ahead; step += 1) {
      wanted.push(index + step * direction);
      if (step <= this.ahead / 2) wanted.push(index - step * direction);
    }
    const keep = new Set(wanted.filter((i) => i >= 0 && i < stack.length).map((i) => this.key(i, "png")));
    keep.add(this.key(index, "png"));
    this.abort((key, entry) => !keep.has(key) && !key.endsWith("|jpeg") && !entry.current); // scrolled away, or an old window
    for (const next of wanted) {
      if (this.loading.size >= this.parallel) break;
      if (next < 0 || next >= stack.length) continue;
      const key = this.key(next, "png");
      if (!this.bitmaps.has(key) && !this.loading.has(key)) this.request(next, "png");
    }
  }

  // Abort the requests in flight that `unwanted(key, entry)` picks.
  abort(unwanted) {
    for (const [key, entry] of this.loading) {
      if (unwanted(key, entry)) {
        entry.controller.abort();
        this.loading.delete(key);
      }
    }
  }

  remember(key, bitmap) {
    this.bitmaps.set(key, bitmap);
    const shown = this.view.viewport.shown;
    while (this.bitmaps.size > CACHE) {
      const [oldest, old] = this.bitmaps.entries().next().value;
      if (shown && shown.bitmap === old) {
        this.bitmaps.delete(oldest);
        this.bitmaps.set(oldest, old);
        continue;
      }
      this.bitmaps.delete(oldest);
      old.close();
    }
  }

  close() {
    this.abort(() => true);
    for (const bitmap of this.bitmaps.values()) bitmap.close();
  }
}
