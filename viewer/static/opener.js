// Which series each pane opens, on its own so that every way a series reaches a pane is
// in one place: the URL (`show`), a series dropped on a pane or chosen for it
// (`assign`), a study of the patient's list (`openBeside`), the panes a larger layout
// adds (`fill`) and the next or previous series (`stepSeries`, through the URL). The
// series lists are studies.js's; the study view (studyview.js) has the panes, the layout
// and the URL. A series with no images (studies.js's `hasImages`: an SR, a Key Object
// Selection, a presentation state…) opens in no pane, whichever way it is asked for.

import { first } from "./dicomweb.js";
import { hasImages, noImages } from "./studies.js";

export class Opener {
  // `view`: the study view whose panes it fills.
  constructor(view) {
    this.view = view;
    this.filling = Promise.resolve(); // the fills of grown layouts, one after the other
  }

  // Show `target` ({ study, series, sop, frame } from the URL) in the active pane (of
  // the layout: MPR is left).
  async show(target) {
    const view = this.view;
    view.exitMpr();
    const study = target.study || view.study;
    const list = await this.seriesOf(study);
    if (!list) return;
    const pane = view.active;
    const series = target.series || first(list.find(hasImages), "0020000E");
    if (!series) {
      pane.viewport.showMessage("This study has no images.");
      return;
    }
    if (pane.study !== study || pane.series !== series) {
      const entry = list.find((s) => first(s, "0020000E") === series);
      if (!entry) {
        pane.viewport.showMessage("This series is not in the study.");
        return;
      }
      if (!hasImages(entry)) {
        // The pane keeps what it shows, and the URL says so again.
        view.say(noImages(entry));
        if (pane.stack.length) history.replaceState({}, "", pane.url());
        else pane.viewport.showMessage(noImages(entry));
        return;
      }
      await pane.open(study, entry, { sop: target.sop, frame: target.frame || 1 });
      if (pane.series !== series) return;
    }
    let index = 0;
    if (target.sop) {
      index = pane.stack.findIndex((s) => s.sop === target.sop && s.frame === (target.frame || 1));
      if (index < 0) index = Math.max(0, pane.stack.findIndex((s) => s.sop === target.sop));
    }
    pane.go(index, { fromUrl: true });
  }

  // The study's series (QIDO-RS, asked for once), or null when the request failed (the
  // view says why).
  async seriesOf(study) {
    try {
      return await this.view.studies.series(study);
    } catch (error) {
      this.view.fail(error);
      return null;
    }
  }

  // Open `series` of `study` in `pane` (dropped there, or chosen for it).
  async assign(pane, study, series) {
    const view = this.view;
    const list = await this.seriesOf(study);
    const entry = list && list.find((s) => first(s, "0020000E") === series);
    if (!entry) return;
    if (!hasImages(entry)) {
      view.say(noImages(entry));
      return;
    }
    view.exitMpr();
    view.activate(pane);
    await pane.open(study, entry);
    if (pane.series === series) pane.go(0);
  }

  // A study of the patient's list was chosen: its series most like the active pane's
  // (same modality, else the first) opens in the pane beside the active one.
  async openBeside(study) {
    const view = this.view;
    view.exitMpr();
    if (view.layout.name === "1x1") view.setLayout("1x2", { fill: false });
    const pane = view.layout.neighbour(1);
    const series = await view.studies.like(study, view.active.modality);
    if (series) await this.assign(pane, study, first(series, "0020000E"));
  }

  // Panes a larger layout adds get series not on the page yet, in the order a reader
  // reading this study wants them: first this study's next image series (after the
  // active pane's, in series number order, then those before it), as a bigger layout is
  // mostly more of the study being read; then the newest prior study's series most like
  // the active pane's (same modality), to compare with. A pane left over stays empty
  // rather than show a series twice; a prior is opened beside on purpose from the
  // patient's studies (`openBeside`). Fills run one after the other, so that layouts
  // grown quickly (the layout key pressed three times) do not pick the same series.
  fill(panes) {
    this.filling = this.filling.then(() => this.fillNow(panes)).catch(() => {});
    return this.filling;
  }

  async fillNow(panes) {
    const view = this.view;
    if (!panes.length) return;
    await view.ready;
    const wanted = await this.nextSeries();
    // From here to the last pane opened nothing waits: the page cannot change meanwhile.
    const key = (study, series) => `${study}/${series}`;
    const onPage = new Set(view.grid.visible.filter((pane) => pane.series).map((pane) => key(pane.study, pane.series)));
    for (const pane of panes) {
      if (pane.series || !view.grid.visible.includes(pane)) continue;
      const next = wanted.find(([study, entry]) => !onPage.has(key(study, first(entry, "0020000E"))));
      if (!next) break;
      const [study, entry] = next;
      const series = first(entry, "0020000E");
      onPage.add(key(study, series));
      pane.open(study, entry).then(() => {
        if (pane.series === series) pane.go(0);
      });
    }
  }

  // [study, series entry] of the image series `fill` offers, in its order.
  async nextSeries() {
    const view = this.view;
    let images;
    try {
      images = (await view.studies.series(view.study)).filter(hasImages);
    } catch {
      images = [];
    }
    const active = view.active;
    const at = active.study === view.study ? images.findIndex((s) => first(s, "0020000E") === active.series) : -1;
    const wanted = [...images.slice(at + 1), ...images.slice(0, at + 1)].map((entry) => [view.study, entry]);
    const prior = view.studies.newestPrior();
    const like = prior && (await view.studies.like(prior, active.modality));
    if (like) wanted.push([prior, like]);
    return wanted;
  }

  // Series `step` places from the active pane's, in its study.
  async stepSeries(step) {
    const view = this.view;
    const pane = view.active;
    if (!pane.series) return;
    const found = await this.seriesOf(pane.study);
    if (!found) return;
    const list = found.filter(hasImages);
    const at = list.findIndex((s) => first(s, "0020000E") === pane.series);
    const next = list[at + step];
    if (next) view.navigate(`/study/${pane.study}/series/${first(next, "0020000E")}`);
  }
}
