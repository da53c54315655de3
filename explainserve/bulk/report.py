"""report.html: one self-contained page for a bulk run's output folder.

A summary (counts and three plots: verdict rate, score histogram, latency histogram) above a
gallery of one card per input: original | map | surprise region, the prediction, the verdict
with its score and p-value and flag counts, or the error. Buttons sort the cards by score,
p-value, latency or name and filter them by verdict; the page applies ``#filter=ANOMALOUS&sort=score-desc``
from its address by clicking the same buttons, so a view can be linked to. Pictures are embedded
as data URIs: the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from explainserve.bulk import plots
from explainserve.bulk.record import read_results

REPORT = "report.html"
PANELS = (("original", "original"), ("map", "map"), ("region", "surprise region"))
SORTS = (("id-asc", "name"), ("score-desc", "score, highest first"), ("score-asc", "score, lowest first"),
         ("p-asc", "p-value, lowest first"), ("latency-desc", "latency, slowest first"))

STYLE = """
body { font: 14px sans-serif; margin: 16px; color: #111; background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; }
#summary { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; margin-bottom: 12px; }
#counts { min-width: 200px; }
#controls { margin: 8px 0 12px; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
#controls button { padding: 3px 8px; border: 1px solid #888; background: #f4f4f4; border-radius: 3px; cursor: pointer; }
#controls button[aria-pressed="true"] { background: #333; color: #fff; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
.card { border: 1px solid #ccc; border-left: 6px solid #969696; padding: 8px; border-radius: 4px; }
.card[data-verdict="ANOMALOUS"] { border-left-color: #d7301f; }
.card[data-verdict="NORMAL"] { border-left-color: #2c7fb8; }
.card[data-verdict="ERROR"] { border-left-color: #252525; }
.card[hidden] { display: none; }
.pictures { display: flex; gap: 6px; align-items: flex-start; overflow-x: auto; }
figure { margin: 0; } figcaption { font-size: 11px; color: #555; }
img { display: block; max-height: 180px; image-rendering: pixelated; }
.verdict { font-weight: bold; } .id { font-family: monospace; word-break: break-all; }
.error { color: #a00; font-family: monospace; }
"""

SCRIPT = """
(function () {
  const gallery = document.getElementById('gallery');
  const state = {filter: 'ALL', sort: 'id-asc'};
  function value(card, key) {
    if (key === 'id') return card.dataset.id;
    const number = parseFloat(card.dataset[key]);
    return isNaN(number) ? null : number;
  }
  function apply() {
    const [key, order] = state.sort.split('-');
    const sign = order === 'desc' ? -1 : 1;
    const cards = Array.from(gallery.querySelectorAll('.card'));
    cards.sort(function (a, b) {
      const x = value(a, key), y = value(b, key);
      if (x === null || y === null) return (x === null) - (y === null);  // no value: last
      return x < y ? -sign : x > y ? sign : (a.dataset.id < b.dataset.id ? -1 : 1);
    });
    let shown = 0;
    cards.forEach(function (card) {
      gallery.appendChild(card);
      card.hidden = state.filter !== 'ALL' && card.dataset.verdict !== state.filter;
      shown += !card.hidden;
    });
    gallery.dataset.filter = state.filter;
    gallery.dataset.sort = state.sort;
    document.getElementById('shown').textContent = shown;
    document.querySelectorAll('#controls button').forEach(function (button) {
      const pressed = button.dataset.filter === state.filter || button.dataset.sort === state.sort;
      button.setAttribute('aria-pressed', pressed ? 'true' : 'false');
    });
    const box = function (element) {
      const r = element.getBoundingClientRect();
      return {x: r.left, y: r.top, width: r.width, height: r.height};
    };
    const visible = cards.filter(function (card) { return !card.hidden; });
    document.body.dataset.layout = JSON.stringify({
      summary: box(document.getElementById('summary')), gallery: box(gallery),
      cards: visible.slice(0, 4).map(box),
      columns: new Set(visible.map(function (card) { return Math.round(box(card).x); })).size});
  }
  document.querySelectorAll('#controls button').forEach(function (button) {
    button.addEventListener('click', function () {
      if (button.dataset.filter) state.filter = button.dataset.filter;
      if (button.dataset.sort) state.sort = button.dataset.sort;
      apply();
    });
  });
  apply();
  new URLSearchParams(location.hash.slice(1)).forEach(function (wanted, name) {
    const button = document.querySelector('#controls button[data-' + name + '="' + CSS.escape(wanted) + '"]');
    if (button) button.click();
  });
})();
"""


def verdict_key(line: dict) -> str:
    """The card's verdict key: NORMAL, ANOMALOUS, NONE (answered without a verdict) or ERROR."""
    if line["status"] != "ok":
        return "ERROR"
    return line.get("verdict") if line.get("verdict") in ("NORMAL", "ANOMALOUS") else "NONE"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def number(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def card(line: dict, folder: Path) -> str:
    key = verdict_key(line)
    attributes = (f'data-id="{escape(line["id"])}" data-verdict="{key}" data-score="{number(line.get("score"), 6)}" '
                  f'data-p="{number(line.get("p_value"), 6)}" data-latency="{number(line["timings"].get("client"), 6)}"')
    head = (f'<p><span class="verdict">{plots.VERDICT_NAMES[key]}</span> '
            f'<span class="id">{escape(line["id"])}</span></p>')
    if line["status"] != "ok":
        return (f'<article class="card" {attributes}>{head}<p class="error">{escape(line["error"]["code"])}: '
                f'{escape(line["error"]["message"])}</p></article>')
    pictures = line.get("pictures", {})
    figures = "".join(f'<figure><img alt="{name}" src="{data_uri(folder / pictures[name])}">'
                      f'<figcaption>{caption}</figcaption></figure>'
                      for name, caption in PANELS if name in pictures and (folder / pictures[name]).is_file())
    predicted = line["predicted"]
    facts = [f'predicted <b>{escape(predicted["name"] or str(predicted["index"]))}</b> {number(predicted["score"])}']
    if line.get("verdict"):
        facts.append(f'score {number(line["score"])}')
        if line.get("p_value") is not None:
            facts.append(f'p {number(line["p_value"])}')
        facts.append(f'surprising {line["surprise_count"]}, missing {line["expectation_count"]}')
    else:
        facts.append(f'anomaly {escape(line["anomaly_status"])}')
    facts.append(f'{line["timings"].get("client", 0):.2f} s')
    region = line.get("region")
    region_text = (f'<p>surprise region: filter {region["filter"]}, training exemplars '
                   f'{", ".join(map(str, region["exemplars"])) or "none stored"}</p>' if region else "")
    return (f'<article class="card" {attributes}>{head}<div class="pictures">{figures}</div>'
            f'<p>{" · ".join(facts)}</p>{region_text}</article>')


def write_report(folder: Path, title: str = "explainserve bulk explanations") -> Path:
    """Write ``folder/report.html`` from ``folder/results.jsonl`` and its pictures; returns its path."""
    folder = Path(folder)
    lines = sorted(read_results(folder).values(), key=lambda line: line["id"])
    verdicts = {key: 0 for key in plots.VERDICT_COLOURS}
    for line in lines:
        verdicts[verdict_key(line)] += 1
    answered = [line for line in lines if line["status"] == "ok"]
    summary = (
        f'<div id="counts"><h1>{escape(title)}</h1><p>{len(lines)} inputs: {len(answered)} answered, '
        f'{verdicts["ERROR"]} errors, {verdicts["ANOMALOUS"]} anomalous</p>'
        f'<p>models: {escape(", ".join(sorted({line["model"] for line in answered})) or "none")}</p></div>'
        + plots.verdict_rate(verdicts)
        + plots.histogram([line.get("score") for line in answered], "verdict score", "", "plot-scores")
        + plots.histogram([line["timings"].get("client") for line in answered], "latency", "s", "plot-latency"))
    buttons = ("".join(f'<button type="button" data-filter="{key}">{name}</button>'
                       for key, name in (("ALL", "all"), *plots.VERDICT_NAMES.items()))
               + " sort: " + "".join(f'<button type="button" data-sort="{key}">{name}</button>' for key, name in SORTS))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><section id="summary">{summary}</section>'
            f'<nav id="controls">show: {buttons} <span><span id="shown">{len(lines)}</span> shown</span></nav>'
            f'<main id="gallery">{"".join(card(line, folder) for line in lines)}</main>'
            f'<script>{SCRIPT}</script></body></html>')
    path = folder / REPORT
    path.write_text(page)
    return path
