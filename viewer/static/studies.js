// The studies the view can show, on their own so that what is asked of QIDO-RS about
// them is in one place: the patient's studies (the priors: by Patient ID, the issuer
// compared in the browser, newest first; dicomweb.js) and each study's series in series
// number order, each list asked for once and shown in the strip (strip.js) when it comes;
// and which series have images to show (`hasImages`).

import { first, formatDate, patientStudies, searchSeries, text } from "./dicomweb.js";

export class Studies {
  // `study`: the study the view was opened on.
  constructor(study, strip, signal) {
    this.study = study;
    this.strip = strip;
    this.signal = signal;
    this.known = new Map([[study, { entry: null, series: null }]]); // study → QIDO-RS answers
    this.patient = []; // the patient's studies, newest first
  }

  // Whether `study` is one of those the view has asked about.
  has(study) {
    return this.known.has(study);
  }

  // Study `study`'s series in series number order (asked for once).
  async series(study) {
    const known = this.known.get(study) || { entry: null, series: null };
    this.known.set(study, known);
    if (!known.series) {
      known.series = searchSeries(study, this.signal).then((list) =>
        list.sort((a, b) => (first(a, "00200011") ?? 1e9) - (first(b, "00200011") ?? 1e9)),
      );
      known.series.catch(() => {
        known.series = null; // asked again next time
      });
      const list = await known.series;
      this.strip.showSeries(study, list, study === this.study ? "This study" : studyHeading(known.entry));
    }
    return known.series;
  }

  // Study `study`'s series asked for again and shown: a save added an SR and a KO series.
  refresh(study) {
    const known = this.known.get(study);
    if (known) known.series = null;
    return this.series(study);
  }

  // The patient's studies, into the strip; without them the strip lists this study's
  // series only.
  async loadPatient() {
    try {
      this.patient = await patientStudies(this.study, this.signal);
    } catch {
      return;
    }
    for (const entry of this.patient) {
      const uid = first(entry, "0020000D");
      const known = this.known.get(uid) || { entry: null, series: null };
      known.entry = entry;
      this.known.set(uid, known);
    }
    this.strip.showStudies(this.patient);
  }

  // Study `study`'s image series most like one of `modality`: of the same modality, else
  // the first; null when there is none, or no answer.
  async like(study, modality) {
    let list;
    try {
      list = await this.series(study);
    } catch {
      return null;
    }
    const images = list.filter(hasImages);
    return images.find((s) => text(s, "00080060") === modality) || images[0] || null;
  }

  // The newest study of the patient other than the one opened (its UID), if any.
  newestPrior() {
    return this.patient.map((s) => first(s, "0020000D")).find((uid) => uid !== this.study);
  }
}

// Modalities whose objects hold no Pixel Data (PS3.3 C.7.3.1.1.1): a structured report
// (the viewer's own saved measurements among them), a key object selection, a
// presentation state, an encapsulated document, a registration, RT structures, plans and
// records, waveforms. The server renders nothing for them (a 400), so their series get no
// thumbnail and open in no image pane.
const NO_IMAGES = new Set(["SR", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "AU", "ECG", "HD", "EPS", "RESP"]);

// Whether series `series` (a QIDO-RS series answer) has images to show: not of a modality
// without pixel data, and not said to have no instances.
export function hasImages(series) {
  return !NO_IMAGES.has(text(series, "00080060")) && (first(series, "00201209") ?? 1) > 0;
}

// What names series `series` (a QIDO-RS series answer) in the strip and in messages: its
// description, else its number.
export function seriesLabel(series) {
  return text(series, "0008103E") || `Series ${first(series, "00200011") ?? ""}`.trim();
}

// What a pane or the status line says of series `series`, which has no images.
export function noImages(series) {
  return `${seriesLabel(series)} (${text(series, "00080060") || "no modality"}) has no images to show.`;
}

// The study's day as YYYY-MM-DD (QIDO-RS answer or instance metadata).
export function studyDay(item) {
  return formatDate(first(item, "00080020"));
}

function studyHeading(entry) {
  if (!entry) return "Other study";
  return `${studyDay(entry)} ${text(entry, "00080061")}`.trim();
}
