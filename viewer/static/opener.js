// Which series each pane opens, on its own so that every way a series reaches a pane is
// in one place: the URL (`show`), a series dropped on a pane or chosen for it
// (`assign`), a study of the patient's list (`openBeside`), the panes a larger layout
// adds (`fill`) and the next or previous series (`stepSeries`, through the URL). The
// series lists are studies.js's; the study view (studyview.js) has the panes, the layout
// and the URL.

import { first } from "./dicomweb.js";

export class Opener {
  // `view`: the study view whose panes it fills.
  constructor(view) {
    this.view = view;
  }

  // Show `target` ({ study, series, sop, frame } from the URL) in the active pane (of
  // the layout: MPR is left).
  async show(target) {
    const view = this.view;
    view.exitMpr();
    const study = target.study || view.study;
    let list;
    try {
      list = await view.studies.series(study);
    } catch (error) {
      view.fail(error);
      return;
    }
    const pane = view.active;
    const series = target.series || first(list[0], "0020000E");
    if (pane.study !== study || pane.series !== series) {
      const entry = list.find((s) => first(s, "0020000E") === series);
      if (!entry) {
        pane.viewport.showMessage("This series is not in the study.");
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

  // Open `series` of `study` in `pane` (dropped there, or chosen for it).
  async assign(pane, study, series) {
    const view = this.view;
    let list;
    try {
      list = await view.studies.series(study);
    } catch (error) {
      view.fail(error);
      return;
    }
    const entry = list.find((s) => first(s, "0020000E") === series);
    if (!entry) return;
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

  // Panes a larger layout adds get, in turn: the newest other study of the patient (to
  // compare), then this study's series not on the page yet.
  async fill(panes) {
    const view = this.view;
    if (!panes.length) return;
    await view.ready;
    const wanted = [];
    const other = view.studies.newestPrior();
    if (other) {
      const series = await view.studies.like(other, view.active.modality);
      if (series) wanted.push([other, first(series, "0020000E")]);
    }
    const onPage = new Set(view.grid.visible.map((pane) => pane.series));
    for (const series of await view.studies.series(view.study)) {
      const uid = first(series, "0020000E");
      if (!onPage.has(uid)) wanted.push([view.study, uid]);
    }
    for (const pane of panes) {
      const next = wanted.shift();
      if (!next) break;
      if (pane.series) continue;
      const [study, series] = next;
      const entry = (await view.studies.series(study)).find((s) => first(s, "0020000E") === series);
      pane.open(study, entry).then(() => {
        if (pane.series === series) pane.go(0);
      });
    }
  }

  // Series `step` places from the active pane's, in its study.
  async stepSeries(step) {
    const view = this.view;
    const pane = view.active;
    if (!pane.series) return;
    const list = await view.studies.series(pane.study);
    const at = list.findIndex((s) => first(s, "0020000E") === pane.series);
    const next = list[at + step];
    if (next) view.navigate(`/study/${pane.study}/series/${first(next, "0020000E")}`);
  }
}
