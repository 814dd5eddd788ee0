// The search page: state lives in the URL (?q=, ?similar=, k, min) so a search can be shared.
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let results = [];

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
}

function boxesSvg(svg, regions, hw) {
  // boxes are in the original image's pixels; the viewBox maps them onto the shown image
  svg.replaceChildren();
  if (!hw || !hw[0]) return;
  svg.setAttribute("viewBox", `0 0 ${hw[1]} ${hw[0]}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const r of regions || []) {
    const [x1, y1, x2, y2] = r.box;
    const rect = document.createElementNS(SVG, "rect");
    Object.entries({ x: x1, y: y1, width: x2 - x1, height: y2 - y1 }).forEach(([k, v]) => rect.setAttribute(k, v));
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", x1 + 3);
    label.setAttribute("y", y1 + 14);
    label.setAttribute("font-size", Math.max(12, hw[0] / 25));
    label.textContent = r.label;
    svg.append(rect, label);
  }
}

function markQuery(query, result) {
  // the query with the words that weighed most in the best result marked (its top three)
  const box = $("query-words");
  box.replaceChildren();
  if (!result || !result.prominent_words) return;
  const top = new Set(result.prominent_words.map((w) => w.toLowerCase()));
  const weight = Object.fromEntries((result.words || []).map(([w, v]) => [w.toLowerCase(), v]));
  box.append("prominent words: ");
  for (const token of query.split(/(\s+)/)) {
    const word = token.toLowerCase().replace(/[^\w'-]/g, "");
    if (top.has(word)) box.append(el("mark", { textContent: token, title: `prominence ${(weight[word] || 0).toFixed(2)}` }));
    else box.append(token);
  }
}

function applyCutoff() {
  const min = parseFloat($("cutoff").value);
  $("cutoff-value").textContent = min.toFixed(2);
  document.querySelectorAll(".result, #captions-list li").forEach((node) => {
    node.classList.toggle("hidden", parseFloat(node.dataset.score) < min);
  });
}

function showImages(payload) {
  results = payload.results;
  $("captions-list").replaceChildren();
  const grid = $("grid");
  grid.replaceChildren();
  for (const r of results) {
    const svg = document.createElementNS(SVG, "svg");
    const img = el("img", { src: r.thumb_url, alt: r.id, loading: "lazy" });
    const words = (r.prominent_words || []).join(", ");
    const card = el("div", { className: "result" },
      el("div", { className: "frame" }, img, svg),
      el("div", { className: "meta" },
        el("span", { className: "rank", textContent: `#${r.rank}` }),
        el("span", { className: "score", textContent: r.score.toFixed(3) }),
        el("div", { className: "words", textContent: words })));
    card.dataset.score = r.score;
    card.dataset.id = r.id;
    boxesSvg(svg, r.regions, r.hw);
    card.addEventListener("click", () => openDetail(r));
    grid.append(card);
  }
  applyCutoff();
}

function showCaptions(payload) {
  $("grid").replaceChildren();
  const list = $("captions-list");
  list.replaceChildren();
  for (const r of payload.results) {
    const item = el("li", {}, el("span", { className: "score", textContent: r.score.toFixed(3) }), r.caption);
    item.dataset.score = r.score;
    if (r.id) item.addEventListener("click", () => openDetail({ id: r.id, image_url: r.image_url, regions: [], hw: null }));
    list.append(item);
  }
  applyCutoff();
}

async function openDetail(r) {
  const info = await fetchJson(`/api/image/${encodeURI(r.id)}`);
  if (!info) return;
  $("detail-id").textContent = r.id;
  $("detail-image").src = info.image_url;
  boxesSvg($("detail-boxes"), r.regions, info.hw);
  $("captions").replaceChildren(...(info.captions.length ? info.captions : ["(no indexed captions)"]).map((c) => el("li", { textContent: c })));
  $("more-like-this").onclick = () => { $("detail").close(); go({ similar: r.id }); };
  $("detail").showModal();
}

async function fetchJson(url, options) {
  $("status").textContent = "searching...";
  const started = performance.now();
  try {
    const response = await fetch(url, options);
    const body = await response.json();
    if (!response.ok) {
      $("status").textContent = `error: ${body.error || response.status}`;
      return null;
    }
    $("status").textContent = `${(body.results || []).length} results in ${Math.round(performance.now() - started)} ms`
      + (body.search ? ` (${body.search.path} over ${body.search.gallery})` : "");
    return body;
  } catch (err) {
    $("status").textContent = `error: ${err}`;
    return null;
  }
}

function go(state, replace = false) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value) params.set(key, value);
  const k = $("k").value, min = $("cutoff").value;
  if (k !== "20") params.set("k", k);
  if (min !== "0") params.set("min", min);
  history[replace ? "replaceState" : "pushState"]({}, "", `/?${params}`);
  run();
}

async function run() {
  const params = new URLSearchParams(location.search);
  $("q").value = params.get("q") || "";
  if (params.get("k")) $("k").value = params.get("k");
  $("cutoff").value = params.get("min") || "0";
  $("label").value = params.get("label") || "";
  const k = $("k").value;
  if (params.get("q")) {
    const label = params.get("label") ? `&label=${encodeURIComponent(params.get("label"))}` : "";
    const payload = await fetchJson(`/api/search?q=${encodeURIComponent(params.get("q"))}&k=${k}${label}`);
    if (payload) { showImages(payload); markQuery(payload.query, payload.results[0]); }
  } else if (params.get("similar")) {
    const payload = await fetchJson(`/api/similar/${encodeURI(params.get("similar"))}?k=${k}`);
    if (payload) { showImages(payload); $("query-words").textContent = `images like ${params.get("similar")}`; }
  }
}

async function upload(file) {
  const form = new FormData();
  form.append("image", file);
  const payload = await fetchJson(`/api/search?k=${$("k").value}`, { method: "POST", body: form });
  if (payload) { showCaptions(payload); $("query-words").textContent = `captions for ${file.name}`; }
}

$("search").addEventListener("submit", (e) => { e.preventDefault(); go({ q: $("q").value.trim(), label: $("label").value.trim() }); });
$("cutoff").addEventListener("input", applyCutoff);
$("show-regions").addEventListener("change", (e) => document.body.classList.toggle("no-regions", !e.target.checked));
$("close").addEventListener("click", () => $("detail").close());
$("file").addEventListener("change", (e) => e.target.files[0] && upload(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });
window.addEventListener("popstate", run);
run();
