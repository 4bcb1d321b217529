// Router: the URL says what is shown; links marked data-link and history.pushState move
// between views without reloading, and back/forward re-route.

import { studyList } from "./studylist.js";
import { studyView } from "./studyview.js";

const main = document.getElementById("main");
let current = null; // { kind, study, view }

export function navigate(url, { replace = false } = {}) {
  if (url === location.pathname + location.search) return;
  history[replace ? "replaceState" : "pushState"]({}, "", url);
  route();
}

function parseStudyPath(path) {
  const parts = path.split("/").filter(Boolean); // study, S, series, SE, instance, I
  return {
    study: decodeURIComponent(parts[1] || ""),
    series: parts[2] === "series" ? decodeURIComponent(parts[3] || "") : "",
    sop: parts[4] === "instance" ? decodeURIComponent(parts[5] || "") : "",
    frame: Number(new URLSearchParams(location.search).get("frame")) || 1,
  };
}

function route() {
  if (location.pathname.startsWith("/study/")) {
    const target = parseStudyPath(location.pathname);
    if (current && current.kind === "study" && current.view.shows(target.study)) {
      current.view.show(target); // a study the view has open: move within it, no rebuild
      return;
    }
    replace("study", target.study, (root) => studyView(root, target, navigate));
  } else {
    replace("list", "", (root) => studyList(root, new URLSearchParams(location.search), navigate));
  }
}

function replace(kind, study, build) {
  if (current) current.view.close();
  main.replaceChildren();
  current = { kind, study, view: build(main) };
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", route);
route();
