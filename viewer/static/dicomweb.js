// The viewer's client of its server: DICOMweb (QIDO-RS searches, metadata and rendered
// images) and the viewer API under /api (geometry, ROI statistics, MPR planes, saved
// measurements and key images),
// all same origin, through fetch with AbortSignals so stale requests can be cancelled.

export const ROOT = "/dicom-web";

export class RequestError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function check(response) {
  if (response.ok) return response;
  if (response.status === 401) {
    // the session ended (or never began): log in, then come back here
    const here = `${location.pathname}${location.search}`;
    location.assign(`/login?next=${encodeURIComponent(here)}`);
  }
  let reason = response.statusText;
  try {
    reason = (await response.json()).error || reason;
  } catch {
    // not JSON: keep the status text
  }
  throw new RequestError(response.status, reason);
}

export async function getJSON(path, params, signal) {
  const query = params && [...params].length ? `?${params}` : "";
  const response = await fetch(`${ROOT}${path}${query}`, {
    headers: { Accept: "application/dicom+json" },
    signal,
  });
  await check(response);
  return response.json();
}

export function searchStudies(params, signal) {
  return getJSON("/studies", params, signal);
}

// The studies of `study`'s patient, itself included: same Patient ID and the same Issuer
// of Patient ID (both absent counts as the same), newest first.
export async function patientStudies(study, signal) {
  const fields = "00100021,00081030";
  const [self] = await searchStudies(new URLSearchParams({ StudyInstanceUID: study, includefield: fields }), signal);
  if (!self) return [];
  const id = text(self, "00100020");
  if (!id) return [self];
  const issuer = text(self, "00100021");
  const found = await searchStudies(new URLSearchParams({ PatientID: id, includefield: fields }), signal);
  const same = found.filter((s) => text(s, "00100020") === id && text(s, "00100021") === issuer);
  if (!same.some((s) => first(s, "0020000D") === study)) same.push(self);
  const when = (s) => `${first(s, "00080020") || ""}${first(s, "00080030") || ""}`;
  return same.sort((a, b) => (when(a) < when(b) ? 1 : when(a) > when(b) ? -1 : 0));
}

export function searchSeries(study, signal) {
  const params = new URLSearchParams({ includefield: "00080021,00080031" });
  return getJSON(`/studies/${study}/series`, params, signal);
}

// The series' instances, in the order stored; `params`: more QIDO-RS parameters.
export function searchInstances(study, series, signal, params) {
  return getJSON(`/studies/${study}/series/${series}/instances`, params && new URLSearchParams(params), signal);
}

export async function instanceMetadata(study, series, sop, signal) {
  const items = await getJSON(`/studies/${study}/series/${series}/instances/${sop}/metadata`, null, signal);
  return items[0];
}

export function seriesMetadata(study, series, signal) {
  return getJSON(`/studies/${study}/series/${series}/metadata`, null, signal);
}

export function instancePath(study, series, sop) {
  return `${ROOT}/studies/${study}/series/${series}/instances/${sop}`;
}

// The URL of one rendered frame: window is null (the file's own), "auto" or {center, width}.
export function renderedURL(study, series, sop, frame, { window, format, quality, viewport }) {
  const params = new URLSearchParams();
  if (window === "auto") params.set("window", "auto");
  else if (window) params.set("window", `${round(window.center)},${round(window.width)}`);
  params.set("accept", format === "png" ? "image/png" : "image/jpeg");
  if (format !== "png") params.set("quality", String(quality || 90));
  if (viewport) params.set("viewport", `${viewport[0]},${viewport[1]}`);
  return `${instancePath(study, series, sop)}/frames/${frame}/rendered?${params}`;
}

export function thumbnailURL(study, series) {
  return `${ROOT}/studies/${study}/series/${series}/thumbnail?viewport=96,96`;
}

export async function fetchBitmap(url, signal) {
  const response = await check(await fetch(url, { signal }));
  return createImageBitmap(await response.blob());
}

function round(value) {
  return Math.round(value * 100) / 100;
}

// -- the viewer API (docs/viewer-api.md): what PS3.18 has no resource for ----------------

async function api(path, { signal, method = "GET", body } = {}) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const response = await fetch(`/api${path}`, { signal, method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  await check(response);
  return response.json();
}

// The series' geometry: positions, orientation, spacing and its kind of every instance,
// and whether they form a volume.
export function seriesGeometry(study, series, signal) {
  return api(`/studies/${study}/series/${series}/geometry`, { signal });
}

// ROI statistics in modality units: `shape` "ellipse" or "rectangle" in the box of two
// image points.
export function roiStatistics(study, series, sop, frame, shape, [[x0, y0], [x1, y1]], signal) {
  const params = new URLSearchParams({ shape, x0, y0, x1, y1, frame });
  return api(`/studies/${study}/series/${series}/instances/${sop}/roi?${params}`, { signal });
}

// A volume's MPR planes (docs/viewer-api.md, 3): their sizes and where their pixels lie
// in the patient; a series that is not a volume is a 409 with the reason.
export function mprPlanes(study, series, signal) {
  return api(`/studies/${study}/series/${series}/mpr`, { signal });
}

// The URL of plane `plane` at `index`, windowed as renderedURL's.
export function planeURL(study, series, plane, index, { window, format, quality }) {
  const params = new URLSearchParams({ format });
  if (window === "auto") params.set("window", "auto");
  else if (window) params.set("window", `${round(window.center)},${round(window.width)}`);
  if (format !== "png") params.set("quality", String(quality || 90));
  return `/api/studies/${study}/series/${series}/mpr/${plane}/${index}?${params}`;
}

// The study's newest saved measurement report, and saving one (SR TID 1500 + KOS).
export function savedMeasurements(study, signal) {
  return api(`/studies/${study}/measurements`, { signal });
}

export function saveMeasurements(study, report, signal) {
  return api(`/studies/${study}/measurements`, { signal, method: "POST", body: report });
}

// -- reading DICOM JSON --------------------------------------------------------------

export function values(item, tag) {
  return (item && item[tag] && item[tag].Value) || [];
}

export function first(item, tag) {
  const found = values(item, tag);
  return found.length ? found[0] : undefined;
}

export function text(item, tag) {
  // For people: several values (ModalitiesInStudy "CT, SR") with a comma, not DICOM's "\\".
  return values(item, tag)
    .map((v) => (v && typeof v === "object" ? personName(v) : String(v)))
    .join(", ");
}

export function personName(value) {
  const alphabetic = value.Alphabetic || value.Ideographic || value.Phonetic || "";
  const [family, given, middle, prefix, suffix] = alphabetic.split("^");
  const rest = [given, middle].filter(Boolean).join(" ");
  const name = [family, rest].filter(Boolean).join(", ");
  return [prefix, name, suffix].filter(Boolean).join(" ");
}

export function formatDate(value) {
  const digits = String(value || "");
  return digits.length === 8 ? `${digits.slice(0, 4)}-${digits.slice(4, 6)}-${digits.slice(6)}` : digits;
}
