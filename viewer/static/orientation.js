// Where an image lies in the patient: its plane (ImageOrientationPatient and
// ImagePositionPatient, or the functional groups of an enhanced multi-frame), its pixel
// spacing and what that spacing measures, the letters of the directions its edges point
// to, and the line another image's plane cuts through it (reference lines).
//
// Patient space is DICOM's LPS: +x towards the patient's left, +y posterior, +z head
// (PS3.3 C.7.6.2.1.1). Image coordinates are (x, y) in pixels from the image's top-left
// corner, x along the columns and y down the rows, a pixel's centre at (c + 0.5, r + 0.5).

import { first, values } from "./dicomweb.js";

// A secondary letter is shown once a direction leans this far towards a second axis
// (the cosine's component, ~1°): real oblique planes get two letters, rounding noise
// in an axial ImageOrientationPatient does not.
const OBLIQUE = 0.02;
const LETTERS = [
  ["L", "R"],
  ["P", "A"],
  ["H", "F"],
];

// The frame's item in a functional group sequence: per-frame first, then shared.
function functionalGroup(meta, frame, sequence) {
  const perFrame = values(meta, "52009230")[frame - 1];
  const shared = values(meta, "52009229")[0];
  for (const group of [perFrame, shared]) {
    const item = first(group, sequence);
    if (item) return item;
  }
  return undefined;
}

function numbers(item, tag, count) {
  const found = values(item, tag).map(Number);
  return found.length === count && found.every(Number.isFinite) ? found : null;
}

// The plane of frame `frame` (from 1): { row, column, normal, position } or null.
// `row` is the direction of increasing column index, `column` of increasing row index.
export function planeOf(meta, frame = 1) {
  if (!meta) return null;
  const cosines =
    numbers(meta, "00200037", 6) || numbers(functionalGroup(meta, frame, "00209116"), "00200037", 6);
  const position =
    numbers(meta, "00200032", 3) || numbers(functionalGroup(meta, frame, "00209113"), "00200032", 3);
  if (!cosines || !position) return null;
  return makePlane(cosines.slice(0, 3), cosines.slice(3), position);
}

// A plane from the directions of its rows and columns and the position of its first
// pixel's centre (null when they do not span one).
export function makePlane(row, column, position) {
  const normal = normalise(cross(row, column));
  return normal ? { row, column, normal, position } : null;
}

// Pixel spacing in mm between rows and between columns, and what it measures:
// "patient" (PixelSpacing), "detector" (only ImagerPixelSpacing: at the detector, not
// in the patient, PS3.3 10.7.1.3) or "px" (no spacing: lengths in pixels, never mm).
export function spacingOf(meta, frame = 1) {
  const patient =
    numbers(meta, "00280030", 2) || numbers(functionalGroup(meta, frame, "00289110"), "00280030", 2);
  if (patient && patient[0] > 0 && patient[1] > 0) return { row: patient[0], column: patient[1], kind: "patient" };
  const detector = numbers(meta, "00181164", 2);
  if (detector && detector[0] > 0 && detector[1] > 0) return { row: detector[0], column: detector[1], kind: "detector" };
  return { row: 1, column: 1, kind: "px" };
}

// Everything the views need of where frame `frame` lies, from the instance's metadata:
// { plane, spacing, frameOfReference, location, thickness } (plane null when unknown).
export function geometryOf(meta, frame = 1) {
  const location = first(meta, "00201041");
  const thickness = first(meta, "00180050");
  return {
    plane: planeOf(meta, frame),
    spacing: spacingOf(meta, frame),
    frameOfReference: first(meta, "00200052") || "",
    location: location === undefined || location === "" ? null : Number(location),
    thickness: thickness === undefined || thickness === "" ? null : Number(thickness),
  };
}

// The same from one instance of the server's series geometry (docs/viewer-api.md, 1).
export function geometryFromApi(item) {
  const cosines = item.imageOrientationPatient;
  const position = item.imagePositionPatient;
  let plane = null;
  if (cosines && cosines.length === 6 && position && position.length === 3) {
    plane = makePlane(cosines.slice(0, 3), cosines.slice(3), position);
  }
  const pixel = item.pixelSpacing;
  const spacing = pixel && item.spacingKind !== "px" ? { row: pixel[0], column: pixel[1], kind: item.spacingKind } : { row: 1, column: 1, kind: "px" };
  return {
    plane,
    spacing,
    frameOfReference: item.frameOfReferenceUID || "",
    location: item.sliceLocation ?? null,
    thickness: item.sliceThickness ?? null,
  };
}

// The unit a length in that spacing is given in.
export function unitOf(spacing) {
  return spacing.kind === "patient" ? "mm" : spacing.kind === "detector" ? "mm (detector)" : "px";
}

// A pixel's height ÷ its width: from the spacing, else Pixel Aspect Ratio, else 1.
export function pixelAspect(meta, spacing) {
  if (spacing.kind !== "px") return spacing.row / spacing.column;
  const ratio = values(meta, "00280034").map(Number);
  return ratio.length === 2 && ratio[0] > 0 && ratio[1] > 0 ? ratio[0] / ratio[1] : 1;
}

// The letters of a patient-space direction, dominant axis first and a second one when
// the direction is oblique (PS3.3 C.7.6.1.1.1).
export function patientLetters(vector) {
  const axes = [0, 1, 2].sort((a, b) => Math.abs(vector[b]) - Math.abs(vector[a]));
  let letters = "";
  for (const axis of axes.slice(0, 2)) {
    const component = vector[axis];
    if (letters && Math.abs(component) < OBLIQUE) break;
    letters += LETTERS[axis][component >= 0 ? 0 : 1];
  }
  return letters;
}

// The letters at the four edges of the view. `orient` is the view's 2×2 matrix from
// image directions to screen directions ([a, b, c, d]: screen x = a·x + b·y, screen
// y = c·x + d·y), a signed permutation (rotations by 90° and flips), so its inverse is
// its transpose.
export function edgeLetters(plane, orient) {
  if (!plane) return null;
  const [a, b, c, d] = orient;
  const towards = ([sx, sy]) => {
    const x = a * sx + c * sy;
    const y = b * sx + d * sy;
    return patientLetters(plane.row.map((r, i) => x * r + y * plane.column[i]));
  };
  return { top: towards([0, -1]), right: towards([1, 0]), bottom: towards([0, 1]), left: towards([-1, 0]) };
}

// Where a slice lies along a normal (mm): for syncing parallel slices by position.
export function along(plane, normal) {
  return dot(plane.position, normal);
}

// Whether two planes are parallel (within about 3°).
export function parallel(a, b) {
  return Math.abs(dot(a.normal, b.normal)) > 0.9986;
}

// The patient-space point of image point (x, y).
export function toPatient(plane, spacing, x, y) {
  const u = (x - 0.5) * spacing.column;
  const v = (y - 0.5) * spacing.row;
  return plane.position.map((p, i) => p + u * plane.row[i] + v * plane.column[i]);
}

// The segment, in `target`'s image coordinates, where `source`'s slice cuts `target`'s
// image, clipped to both images; null when the planes are parallel or do not meet
// inside both. Each image is { plane, spacing, columns, rows }.
export function referenceLine(target, source) {
  const { plane: tp, spacing: ts } = target;
  const { plane: sp, spacing: ss } = source;
  // A patient point of the target image is linear in (x, y): P = O + x·X + y·Y.
  const X = tp.row.map((r) => r * ts.column);
  const Y = tp.column.map((c) => c * ts.row);
  const O = toPatient(tp, ts, 0, 0);
  const linear = (vector, offset) => [dot(X, vector), dot(Y, vector), dot(O, vector) + offset];
  // On the source plane: (P − S)·n = 0, i.e. a·x + b·y + c = 0.
  const [a, b, c] = linear(sp.normal, -dot(sp.position, sp.normal));
  const norm = a * a + b * b;
  if (norm < 1e-12 || parallel(tp, sp)) return null;
  const start = [(-a * c) / norm, (-b * c) / norm];
  const direction = [-b, a];
  // Inside both images: each bound is f(x, y) = p·x + q·y + r ≥ 0.
  const sx = linear(sp.row.map((v) => v / ss.column), -dot(sp.position, sp.row) / ss.column + 0.5);
  const sy = linear(sp.column.map((v) => v / ss.row), -dot(sp.position, sp.column) / ss.row + 0.5);
  const bounds = [
    [1, 0, 0],
    [-1, 0, target.columns],
    [0, 1, 0],
    [0, -1, target.rows],
    sx,
    [-sx[0], -sx[1], source.columns - sx[2]],
    sy,
    [-sy[0], -sy[1], source.rows - sy[2]],
  ];
  let low = -Infinity;
  let high = Infinity;
  for (const [p, q, r] of bounds) {
    const at = p * start[0] + q * start[1] + r; // f at t = 0
    const slope = p * direction[0] + q * direction[1]; // df/dt
    if (Math.abs(slope) < 1e-12) {
      if (at < 0) return null;
    } else if (slope > 0) low = Math.max(low, -at / slope);
    else high = Math.min(high, -at / slope);
  }
  if (!(low < high)) return null;
  const point = (t) => [start[0] + t * direction[0], start[1] + t * direction[1]];
  return [point(low), point(high)];
}

function dot(a, b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

function cross(a, b) {
  return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
}

function normalise(v) {
  const length = Math.hypot(...v);
  return length > 1e-6 ? v.map((c) => c / length) : null;
}
