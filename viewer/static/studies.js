// The studies the view can show, on their own so that what is asked of QIDO-RS about
// them is in one place: the patient's studies (the priors: by Patient ID, the issuer
// compared in the browser, newest first; dicomweb.js) and each study's series in series
// number order, each list asked for once and shown in the strip (strip.js) when it comes.

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

  // Study `study`'s series most like one of `modality`: of the same modality, else the
  // first; null when there is none, or no answer.
  async like(study, modality) {
    let list;
    try {
      list = await this.series(study);
    } catch {
      return null;
    }
    return list.find((s) => text(s, "00080060") === modality) || list[0] || null;
  }

  // The newest study of the patient other than the one opened (its UID), if any.
  newestPrior() {
    return this.patient.map((s) => first(s, "0020000D")).find((uid) => uid !== this.study);
  }
}

// The study's day as YYYY-MM-DD (QIDO-RS answer or instance metadata).
export function studyDay(item) {
  return formatDate(first(item, "00080020"));
}

function studyHeading(entry) {
  if (!entry) return "Other study";
  return `${studyDay(entry)} ${text(entry, "00080061")}`.trim();
}
