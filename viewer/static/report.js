// The reader's report on the studies open, on its own so that what is saved to the
// archive is in one place: the key images, and the measurements (measure.js's) saved as
// DICOM, an SR and a Key Object Selection, and reopened from the study's last saved
// report (docs/viewer-api.md, 4). Key images are whole instances, as a Key Object
// Selection keeps them (a frame is not kept): marking a frame of a multi-frame instance
// marks the instance.

import { saveMeasurements, savedMeasurements } from "./dicomweb.js";

export class Report {
  // `measurements`: those of every pane; `changed(study)`: `study`'s key images
  // changed; `say(message)`: the status line.
  constructor(measurements, { changed, say }, signal) {
    this.measurements = measurements;
    this.changed = changed;
    this.say = say;
    this.signal = signal;
    this.canSave = false; // the server has the endpoint: it answered for the saved report
    this.keyImages = new Map(); // sop → { study, series }
    this.saved = new Map(); // study → what its saved report holds: { measurements, keyImages } (counts)
  }

  isKeyImage(sop) {
    return this.keyImages.has(sop);
  }

  // `study`'s key images per series, for the strip.
  keyImageCounts(study) {
    const counts = new Map();
    for (const image of this.keyImages.values()) {
      if (image.study === study) counts.set(image.series, (counts.get(image.series) || 0) + 1);
    }
    return counts;
  }

  // Mark the image `pane` shows as a key image, or unmark it.
  toggleKeyImage(pane) {
    const slice = pane.stack[pane.index];
    if (pane.plane) {
      this.say("An MPR plane is not an image of the archive: mark a slice of the series.");
      return;
    }
    if (!slice) return;
    const marked = !this.keyImages.has(slice.sop);
    if (marked) this.keyImages.set(slice.sop, { study: pane.study, series: pane.series });
    else this.keyImages.delete(slice.sop);
    this.say(marked ? "Marked as a key image." : "No longer a key image.");
    this.changed(pane.study);
  }

  // `study`'s last saved report: its measurements and key images are shown again, and
  // saving is offered (a server without the endpoint has neither). Each comes with its
  // image's series; one whose image has left the study comes without and is left out:
  // no pane can show it, and the server refuses a save that names it.
  async load(study) {
    let report;
    try {
      report = await savedMeasurements(study, this.signal);
    } catch {
      return;
    }
    this.canSave = true;
    const keyImages = report.keyImages || [];
    this.saved.set(study, { measurements: report.measurements.length, keyImages: keyImages.length });
    const [measurements, images] = [report.measurements, keyImages].map((items) => items.filter((item) => item.seriesInstanceUID));
    for (const item of images) this.keyImages.set(item.sopInstanceUID, { study, series: item.seriesInstanceUID });
    this.changed(study);
    this.measurements.load(
      measurements.map((item) => ({
        type: item.type,
        study,
        series: item.seriesInstanceUID,
        sop: item.sopInstanceUID,
        frame: item.frame || 1,
        points: item.points,
        stats: item.stats || null,
      })),
    );
    const gone = report.measurements.length + keyImages.length - measurements.length - images.length;
    if (gone) this.say(`${gone} of the saved measurements and key images are on images no longer in this study: not shown.`);
  }

  // Save `study`'s measurements as an SR and its key images as a Key Object Selection, as
  // they are now: what was saved and is gone now is cleared (the server writes a report
  // with no measurement, or no selection; the old ones stay in the archive). Only what
  // was loaded can be cleared: a study whose saved report this view did not open (a
  // prior) sends nothing when nothing is drawn. True only when the server took it: the
  // caller then re-reads the series, which gained an SR or KOS.
  async save(study) {
    const measurements = this.measurements
      .all()
      .filter((m) => m.study === study && m !== this.measurements.keyed && (m.type !== "angle" || m.points.length === 3))
      // Points only: the server works out values, units and statistics from the stored
      // image (docs/viewer-api.md, 4), whichever panes still show it.
      .map((m) => ({ type: m.type, sopInstanceUID: m.sop, frame: m.frame, points: m.points }));
    const keyImages = [...this.keyImages]
      .filter(([, image]) => image.study === study)
      .map(([sop]) => ({ sopInstanceUID: sop, frame: 1 }));
    const before = this.saved.get(study) || { measurements: 0, keyImages: 0 };
    if (!measurements.length && !keyImages.length && !before.measurements && !before.keyImages) {
      this.say("Nothing to save on this study.");
      return false;
    }
    this.say("Saving…");
    const count = (n, what) => (n ? `${n} ${what}${n === 1 ? "" : "s"}` : "");
    try {
      await saveMeasurements(study, { measurements, keyImages, description: "" }, this.signal);
      this.saved.set(study, { measurements: measurements.length, keyImages: keyImages.length });
      const saved = [count(measurements.length, "measurement"), count(keyImages.length, "key image")].filter(Boolean);
      const cleared = [!measurements.length && before.measurements && "measurements", !keyImages.length && before.keyImages && "key images"].filter(Boolean);
      const said = [saved.length && `saved ${saved.join(" and ")}`, cleared.length && `cleared the saved ${cleared.join(" and ")}`].filter(Boolean).join("; ");
      this.say(`${said[0].toUpperCase()}${said.slice(1)}.`);
      return true;
    } catch (error) {
      if (error.name !== "AbortError") this.say(error.status === 403 ? "Saving needs the uploader role." : `Not saved: ${error.message}`);
      return false;
    }
  }
}
