"""The web labeler's one page: HTML with inline CSS and JS, no build step and nothing fetched from
elsewhere (it works offline). :func:`page` fills in the labeling mode."""

from __future__ import annotations

import json

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastrlhf labeler</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }
header { display: flex; gap: 1.5em; align-items: baseline; border-bottom: 1px solid #ccc; padding-bottom: .5em; }
#progress { font-weight: bold; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f6f6f6; padding: .8em; border-radius: 4px;
      margin: .3em 0; font-family: inherit; }
.pair { display: flex; gap: 1em; }
.pair section { flex: 1; min-width: 0; }
#buttons { margin: 1em 0; display: flex; gap: .5em; flex-wrap: wrap; }
button { font-size: 1em; padding: .4em .9em; cursor: pointer; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3em; font-size: .9em; }
#msg { color: #a40; min-height: 1.2em; }
h3 { margin: .8em 0 .2em; font-size: 1em; color: #555; }
</style>
</head>
<body>
<header>
  <strong>fastrlhf labeler</strong>
  <span id="progress"></span>
  <span id="who"></span>
  <a href="#" id="change" hidden>change name</a>
</header>
<div id="login" hidden>
  <p><label>Your name: <input id="name" autocomplete="username" maxlength="100"></label>
  <button id="start">Start</button></p>
  <p>Your name stays in this browser; the store keeps only a salted hash of it.</p>
</div>
<main id="main" hidden>
  <section><h3>Prompt</h3><pre id="prompt"></pre></section>
  <div class="pair">
    <section><h3 id="h0">[1]</h3><pre id="c0"></pre></section>
    <section id="box1"><h3>[2]</h3><pre id="c1"></pre></section>
  </div>
  <div id="buttons"></div>
</main>
<p id="finished" hidden>All items are labeled: thank you. (<kbd>u</kbd> undoes your last judgment.)</p>
<p id="msg"></p>
<script>
"use strict";
const CONFIG = __CONFIG__;
const TOKEN = new URLSearchParams(location.search).get("token");
const KEY = "fastrlhf-annotator";
const $ = (id) => document.getElementById(id);
let item = null, busy = false;

const ACTIONS = CONFIG.mode === "compare"
  ? [["1", "left is better", {choice: 0}], ["2", "right is better", {choice: 1}], ["t", "tie", {choice: "tie"}],
     ["s", "skip", {skip: true}], ["u", "undo", null]]
  : [["1", "1", {rating: 1}], ["2", "2", {rating: 2}], ["3", "3", {rating: 3}], ["4", "4", {rating: 4}],
     ["5", "5 (best)", {rating: 5}], ["s", "skip", {skip: true}], ["u", "undo", null]];

function url(path, query) {
  const q = new URLSearchParams(query || {});
  if (TOKEN) q.set("token", TOKEN);
  return path + "?" + q.toString();
}

async function call(path, body, query) {
  const opts = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(url(path, query), opts);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function text(v) {
  if (typeof v === "string") return v;
  return v.map((m) => m.role + ": " + m.content).join("\\n");
}

function annotator() { return localStorage.getItem(KEY) || ""; }

function showProgress(data) { $("progress").textContent = data.done + " / " + data.total; }

function show(data) {
  showProgress(data);
  item = data.item;
  $("main").hidden = !item;
  $("finished").hidden = !!item;
  if (!item) return;
  $("prompt").textContent = text(item.prompt);
  $("c0").textContent = text(item.completions[0]);
  $("box1").hidden = CONFIG.mode !== "compare";
  $("h0").textContent = CONFIG.mode === "compare" ? "[1]" : "Completion";
  if (CONFIG.mode === "compare") $("c1").textContent = text(item.completions[1]);
}

async function run(fn) {
  if (busy) return;
  busy = true;
  try { await fn(); } catch (e) { $("msg").textContent = "error: " + e.message; } finally { busy = false; }
}

async function next(prefer) {
  const q = {annotator: annotator()};
  if (prefer) q.prefer = prefer;
  show(await call("api/next", undefined, q));
}

function act(key) {
  const a = ACTIONS.find((x) => x[0] === key);
  if (!a) return;
  run(async () => {
    $("msg").textContent = "";
    if (a[2] === null) {
      const r = await call("api/undo", {annotator: annotator()});
      $("msg").textContent = r.undone ? "undone" : "nothing to undo";
      await next(r.undone);
    } else {
      if (!item) return;
      await call("api/judge", Object.assign({annotator: annotator(), key: item.key}, a[2]));
      await next();
    }
  });
}

function login() {
  const name = $("name").value.trim();
  if (!name) { $("msg").textContent = "enter your name first"; return; }
  localStorage.setItem(KEY, name);
  $("name").blur();  // the keys go to the page, not the (hidden) name field
  start();
}

function start() {
  const name = annotator();
  $("login").hidden = !!name;
  $("change").hidden = !name;
  $("who").textContent = name ? "annotator: " + name : "";
  if (!name) { $("main").hidden = true; $("finished").hidden = true; $("name").focus(); return; }
  run(() => next());
}

for (const [key, label] of ACTIONS) {
  const b = document.createElement("button");
  b.id = "key-" + key;
  b.innerHTML = "<kbd></kbd> ";
  b.firstChild.textContent = key;
  b.appendChild(document.createTextNode(label));
  b.addEventListener("click", () => act(key));
  $("buttons").appendChild(b);
}
$("start").addEventListener("click", login);
$("name").addEventListener("keydown", (e) => { if (e.key === "Enter") login(); });
$("change").addEventListener("click", (e) => { e.preventDefault(); localStorage.removeItem(KEY); start(); });
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey || !annotator()) return;
  act(e.key.toLowerCase());
});
start();
</script>
</body>
</html>
"""


def page(mode: str) -> str:
    """The page's HTML for ``mode`` (``"compare"`` or ``"rate"``)."""
    return _PAGE.replace("__CONFIG__", json.dumps({"mode": mode}))
