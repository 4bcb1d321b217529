// The strip beside the panes: the patient's studies (this one and the others with the
// same Patient ID and issuer, newest first), and the series of each study opened, as
// links (a click or Enter opens the series in the active pane; ] and [ choose that pane
// and leave the focus here, the keyboard's drag) that can also be dragged onto any pane,
// each with the number of its key images. Thumbnails are asked for only
// when told (`loadThumbnails`), so they do not compete with the first image. A series
// with no images (an SR, a Key Object Selection, a presentation state…: studies.js's
// `hasImages`) is listed, but as text: no thumbnail is asked for, and it is no link.

import { first, formatDate, text, thumbnailURL } from "./dicomweb.js";
import { button, el } from "./dom.js";
import { SERIES_TYPE } from "./layout.js";
import { hasImages, seriesLabel } from "./studies.js";

export class Strip {
  // `openStudy(uid)`: a study of the list was chosen (to be shown beside the current).
  constructor(current, openStudy) {
    this.current = current;
    this.openStudy = openStudy;
    this.studyList = el("ul", { class: "patient-studies", "aria-label": "Studies of this patient" });
    this.sections = new Map(); // study → its section of series
    this.keyCounts = new Map(); // study → (series → key images)
    this.node = el("nav", { class: "series", "aria-label": "Series" }, this.studyList);
    this.node.addEventListener("dragstart", (event) => {
      const item = event.target.closest && event.target.closest(".series-item");
      if (!item) return;
      event.dataTransfer.setData(SERIES_TYPE, JSON.stringify({ study: item.dataset.study, series: item.dataset.series }));
      event.dataTransfer.effectAllowed = "copy";
    });
  }

  // The patient's studies, newest first (QIDO-RS study answers).
  showStudies(studies) {
    this.studyList.replaceChildren(
      ...studies.map((study) => {
        const uid = first(study, "0020000D");
        const label = `${formatDate(first(study, "00080020"))} ${text(study, "00080061")}`;
        const description = text(study, "00081030");
        const item = button(
          el("span", {}, el("span", { class: "date" }, label), description ? el("span", { class: "label" }, description) : null),
          () => this.openStudy(uid),
          { class: "study-item", "data-study": uid, "aria-current": uid === this.current ? "true" : "false" },
        );
        if (uid === this.current) item.title = "The study opened";
        return el("li", {}, item);
      }),
    );
  }

  // Study `study`'s series (QIDO-RS series answers, in order) as a section of links.
  showSeries(study, seriesList, heading) {
    let section = this.sections.get(study);
    if (!section) {
      section = el("section", { class: "study-series", "data-study": study, "aria-label": heading });
      this.sections.set(study, section);
      this.node.append(section);
    }
    const items = seriesList.map((series) => seriesItem(study, series));
    section.replaceChildren(el("h2", {}, heading), ...items);
    this.showKeyImages(study, this.keyCounts.get(study) || new Map());
    if (this.thumbnails) this.loadThumbnails(); // the first image is in already
  }

  // How many key images each series of `study` has (series → count).
  showKeyImages(study, counts) {
    this.keyCounts.set(study, counts);
    for (const item of this.node.querySelectorAll(".series-item")) {
      if (item.dataset.study !== study) continue;
      const count = counts.get(item.dataset.series) || 0;
      const badge = item.querySelector(".key-count");
      badge.textContent = count ? `★ ${count} key image${count === 1 ? "" : "s"}` : "";
      badge.hidden = !count;
    }
  }

  // Mark the series shown in the active pane.
  mark(study, series) {
    for (const item of this.node.querySelectorAll(".series-item")) {
      item.setAttribute("aria-current", item.dataset.study === study && item.dataset.series === series ? "true" : "false");
    }
  }

  loadThumbnails() {
    this.thumbnails = true;
    for (const image of this.node.querySelectorAll("img[data-src]")) {
      image.src = image.dataset.src;
      image.removeAttribute("data-src");
    }
  }
}

function seriesItem(study, series) {
  const uid = first(series, "0020000E");
  const label = seriesLabel(series);
  const count = first(series, "00201209") || 0;
  const modality = text(series, "00080060");
  if (!hasImages(series)) {
    return el(
      "div",
      { class: "series-item no-images", "data-series": uid, "data-study": study, title: "No images: nothing to open in a viewport" },
      el("span", { class: "thumb-text", "aria-hidden": "true" }, modality || "?"),
      el("span", { class: "label" }, label),
      el("span", { class: "count" }, `${modality} · no images`),
      el("span", { class: "key-count", hidden: "" }),
    );
  }
  const thumbnail = el("img", { "data-src": thumbnailURL(study, uid), alt: "", width: "96", height: "96" });
  // A series the server cannot render after all (an image-less object under another
  // modality, a compression it cannot decode): its modality as text, not a broken image.
  const failed = () => {
    thumbnail.hidden = true;
    thumbnail.before(el("span", { class: "thumb-text", "aria-hidden": "true" }, modality || "?"));
  };
  thumbnail.addEventListener("error", failed, { once: true });
  return el(
    "a",
    {
      href: `/study/${study}/series/${uid}`,
      "data-link": "",
      class: "series-item",
      "data-series": uid,
      "data-study": study,
      draggable: "true",
      title: "Open in the active viewport (] and [ choose it), or drag onto a viewport",
    },
    thumbnail,
    el("span", { class: "label" }, label),
    el("span", { class: "count" }, `${modality} · ${count} image${count === 1 ? "" : "s"}`),
    el("span", { class: "key-count", hidden: "" }),
  );
}
