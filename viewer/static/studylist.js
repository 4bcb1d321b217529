// The study list: a search form whose fields live in the URL, a sortable table of the
// matching studies (QIDO-RS), paging, and keyboard navigation (arrows, Enter).

import { first, formatDate, searchStudies, text } from "./dicomweb.js";
import { button, el } from "./dom.js";

const PAGE = 50;
const MODALITIES = ["", "CT", "MR", "CR", "DX", "US", "XA", "MG", "NM", "PT", "RF", "OT", "SC", "SR"];
const COLUMNS = [
  { key: "name", label: "Patient", tag: "00100010" },
  { key: "id", label: "Patient ID", tag: "00100020" },
  { key: "birth", label: "Birth date", tag: "00100030", date: true },
  { key: "date", label: "Study date", tag: "00080020", date: true },
  { key: "accession", label: "Accession", tag: "00080050" },
  { key: "modalities", label: "Modalities", tag: "00080061" },
  { key: "description", label: "Description", tag: "00081030" },
  { key: "series", label: "Series", tag: "00201206", number: true },
  { key: "instances", label: "Images", tag: "00201208", number: true },
];
const FIELDS = [
  ["name", "Patient name", "text", "e.g. DOE^J or doe"],
  ["id", "Patient ID", "text", ""],
  ["accession", "Accession", "text", ""],
  ["from", "Study date from", "date", ""],
  ["to", "to", "date", ""],
  ["description", "Description", "text", ""],
];

export function studyList(root, params, navigate) {
  const controller = new AbortController();
  document.title = "Studies — minipacs";
  document.getElementById("where").textContent = "Studies";
  root.append(form(params, navigate), el("div", { id: "results", "aria-live": "polite" }));
  load(root.querySelector("#results"), params, navigate, controller.signal);
  return { close: () => controller.abort(), show() {} };
}

function form(params, navigate) {
  const node = el("form", { class: "search", role: "search", "aria-label": "Find studies" });
  for (const [name, label, type, placeholder] of FIELDS) {
    const input = el("input", { id: `f-${name}`, name, type, value: params.get(name) || "" });
    if (placeholder) input.placeholder = placeholder;
    node.append(el("label", { for: `f-${name}` }, label), input);
  }
  const modality = el("select", { id: "f-modality", name: "modality" });
  for (const code of MODALITIES) {
    const option = el("option", { value: code }, code || "any");
    option.selected = code === (params.get("modality") || "");
    modality.append(option);
  }
  node.append(el("label", { for: "f-modality" }, "Modality"), modality);
  const today = button("Today", () => setDates(node, 0));
  const week = button("Last 7 days", () => setDates(node, 6));
  const clear = button("Clear", () => {
    node.reset();
    for (const input of node.querySelectorAll("input")) input.value = "";
    node.requestSubmit();
  });
  node.append(el("div", { class: "actions" }, el("button", { type: "submit" }, "Search"), today, week, clear));
  node.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(node)) if (String(value).trim()) query.set(key, String(value).trim());
    navigate(`/${query.size ? "?" + query : ""}`);
  });
  return node;
}

function setDates(node, days) {
  const to = new Date();
  const from = new Date(to.getTime() - days * 86400000);
  node.querySelector("[name=from]").value = isoDay(from);
  node.querySelector("[name=to]").value = isoDay(to);
  node.requestSubmit();
}

function isoDay(date) {
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 10);
}

// The QIDO-RS query for the form: a name without wildcards matches any name part that
// starts with it, ignoring case (fuzzymatching); dates become a DA range.
export function qidoParams(params) {
  const query = new URLSearchParams();
  const name = params.get("name");
  if (name) {
    query.set("PatientName", name);
    if (!/[*?]/.test(name)) query.set("fuzzymatching", "true");
  }
  if (params.get("id")) query.set("00100020", params.get("id"));
  if (params.get("accession")) query.set("AccessionNumber", params.get("accession"));
  if (params.get("modality")) query.set("ModalitiesInStudy", params.get("modality"));
  const description = params.get("description");
  if (description) query.set("StudyDescription", /[*?]/.test(description) ? description : `*${description}*`);
  const from = (params.get("from") || "").replaceAll("-", "");
  const to = (params.get("to") || "").replaceAll("-", "");
  if (from || to) query.set("StudyDate", from === to ? from : `${from}-${to}`);
  const page = Math.max(0, Number(params.get("page")) || 0);
  query.set("offset", String(page * PAGE));
  query.set("limit", String(PAGE + 1));
  query.set("includefield", "00081030,00100030");
  return query;
}

async function load(results, params, navigate, signal) {
  results.replaceChildren(el("p", { class: "state" }, "Searching…"));
  let studies;
  try {
    studies = await searchStudies(qidoParams(params), signal);
  } catch (error) {
    if (error.name === "AbortError") return;
    results.replaceChildren(el("p", { class: "state error", role: "alert" }, `Server error: ${error.message}`));
    return;
  }
  const more = studies.length > PAGE;
  studies = studies.slice(0, PAGE);
  if (!studies.length) {
    results.replaceChildren(el("p", { class: "state" }, "No studies match this search."));
    return;
  }
  const sort = params.get("sort") || "";
  results.replaceChildren(table(sorted(studies, sort), params, navigate), pager(params, more, navigate));
}

function sorted(studies, sort) {
  const [key, direction] = sort.split(":");
  const column = COLUMNS.find((c) => c.key === key);
  if (!column) return studies;
  const sign = direction === "desc" ? -1 : 1;
  const valueOf = (study) => (column.number ? Number(first(study, column.tag) || 0) : text(study, column.tag));
  return [...studies].sort((a, b) => {
    const x = valueOf(a);
    const y = valueOf(b);
    return sign * (x < y ? -1 : x > y ? 1 : 0);
  });
}

function table(studies, params, navigate) {
  const [sortKey, direction] = (params.get("sort") || "").split(":");
  const head = el("tr");
  for (const column of COLUMNS) {
    const active = column.key === sortKey;
    const next = active && direction !== "desc" ? "desc" : "asc";
    const th = el("th", { scope: "col", "aria-sort": active ? (direction === "desc" ? "descending" : "ascending") : "none" });
    const query = new URLSearchParams(params);
    query.set("sort", `${column.key}:${next}`);
    th.append(el("a", { href: `/?${query}`, "data-link": "" }, column.label + (active ? (direction === "desc" ? " ▼" : " ▲") : "")));
    head.append(th);
  }
  head.append(el("th", { scope: "col" }, "Download"));
  const body = el("tbody");
  for (const study of studies) {
    const uid = first(study, "0020000D");
    const row = el("tr", { tabindex: "0", class: "study", "data-study": uid });
    for (const column of COLUMNS) {
      const value = column.date ? formatDate(first(study, column.tag)) : text(study, column.tag);
      row.append(el("td", {}, value));
    }
    row.append(el("td", {}, zipLink(uid)));
    const open = () => navigate(`/study/${uid}`);
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter") open();
      else if (event.key === "ArrowDown") row.nextElementSibling?.focus();
      else if (event.key === "ArrowUp") row.previousElementSibling?.focus();
      else return;
      event.preventDefault();
    });
    body.append(row);
  }
  const node = el("table", { class: "studies", "aria-label": "Studies" }, el("thead", {}, head), body);
  node.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" && event.target.tagName !== "TR") body.firstElementChild?.focus();
  });
  return node;
}

// The study as a ZIP with a DICOMDIR (GET /studies/{uid}/archive): a link of its own, so
// Tab reaches it and Enter or a click downloads instead of opening the study.
function zipLink(uid) {
  const link = el("a", { href: `/studies/${uid}/archive`, download: "", class: "zip", "aria-label": `Download study ${uid} as ZIP` }, "ZIP");
  for (const type of ["click", "keydown"]) link.addEventListener(type, (event) => event.stopPropagation());
  return link;
}

function pager(params, more, navigate) {
  const page = Math.max(0, Number(params.get("page")) || 0);
  const go = (to) => {
    const query = new URLSearchParams(params);
    if (to) query.set("page", String(to));
    else query.delete("page");
    navigate(`/?${query}`);
  };
  const previous = button("← Previous", () => go(page - 1));
  previous.disabled = page === 0;
  const next = button("Next →", () => go(page + 1));
  next.disabled = !more;
  return el("nav", { class: "pager", "aria-label": "Pages" }, previous, el("span", {}, `Page ${page + 1}`), next);
}
