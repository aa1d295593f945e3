"""`GET /`: the dashboard, one self-contained page that reads `GET /v1/status` every 2 seconds.

The page is a constant: the server never writes learner data into HTML. Its script builds every
element with DOM calls and sets text with `textContent`, so task names, decisions and paths (which
users choose) are shown as text and never parsed as markup. The Content-Security-Policy header
allows only this page's own script and style (by hash) and requests to this server, so even a
mistake that let markup through could neither run a script nor load anything; the page needs
nothing from the internet (servers often have none).
"""

from __future__ import annotations

import base64
import hashlib

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 26px 0 6px; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; margin: 4px 0; } .meta b { color: #111; font-size: 16px; }
#error { color: #a00; }
table { border-collapse: collapse; margin: 4px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mark td:first-child { font-weight: 600; }
tr.rejected td { background: #fbeaea; color: #777; } tr.rejected td.outcome { color: #a00; font-weight: 600; }
td.promoted { color: #176b2c; font-weight: 600; } td.failed { color: #a00; font-weight: 600; }
td.s0 { background: #fde2e2; } td.s1 { background: #fcefdc; } td.s2 { background: #fbf7dc; }
td.s3 { background: #e8f5dc; } td.s4 { background: #d6efd6; }
svg text { font: 11px system-ui, sans-serif; fill: #555; }
"""

SCRIPT = """
"use strict";
// Everything is built with createElement and textContent: nothing from the server is parsed as HTML.
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells, tag) {
  const tr = el("tr");
  for (const c of cells) tr.append(c instanceof Node ? c : el(tag || "td", c));
  return tr;
}
function num(text, cls) { return el("td", text, "num" + (cls ? " " + cls : "")); }
function fill(id, head, rows, empty) {
  const table = $(id);
  table.replaceChildren(row(head, "th"), ...rows);
  if (!rows.length) { const td = el("td", empty, "note"); td.colSpan = head.length; table.append(row([td])); }
}
const fixed = (x, digits) => (typeof x === "number" ? x.toFixed(digits) : "\u2013");
// A score cell, shaded from red (0) to green (1) so a drop stands out in the matrix.
function score(x) { return num(fixed(x, 2), typeof x === "number" ? "s" + Math.round(4 * Math.min(1, Math.max(0, x))) : ""); }

function versions(s) {
  const rounds = new Map(s.rounds.map((r) => [r.number, r]));
  fill("versions", ["version", "", "parent", "round", "kind", "created", "gate decision"], s.versions.slice().reverse().map((v) => {
    const r = rounds.get(v.round);
    const marks = [v.number === s.served_version && "served", v.number === s.current_version && "current"].filter(Boolean).join(", ");
    const gate = v.kind === "base" ? "base model" : r && r.decision ? r.decision.summary : "";
    const tr = row(["v" + v.number, marks, v.parent === null ? "\u2013" : "v" + v.parent,
      v.round === null ? "\u2013" : v.round, v.kind, v.created_at.replace("T", " "), gate]);
    if (marks) tr.className = "mark";
    return tr;
  }), "no versions");
}

function matrix(s) {
  const made = new Map(s.versions.filter((v) => v.round !== null).map((v) => [v.round, v.number]));
  fill("matrix", ["round", "model", "outcome", ...s.matrix.tasks, "probes", "drift from base"], s.matrix.rows.map((r) => {
    const candidate = r.model === "candidate";
    const who = candidate ? (made.has(r.round) ? "candidate \u2192 v" + made.get(r.round) : "candidate") : "served v" + r.version;
    const outcome = el("td", candidate ? r.outcome || "pending" : "", "outcome" + (r.outcome === "promoted" && candidate ? " promoted" : ""));
    const tr = row([num(r.round), el("td", who), outcome, ...r.scores.map(score), score(r.probes), num(fixed(r.drift_from_base, 3))]);
    if (candidate && r.outcome === "rejected") tr.className = "rejected";  // never served
    return tr;
  }), "no round evaluated yet");
}

function decision(s) {
  const last = s.rounds.filter((r) => r.decision).pop();
  $("decision-summary").textContent = last ? "round " + last.number + ": " + last.decision.summary : "no round decided yet";
  fill("decision", ["check", "value", "rule", "limit", ""], (last ? last.decision.checks : []).map((c) =>
    row([el("td", c.name), num(fixed(c.value, 4)), el("td", c.rule), num(fixed(c.limit, 4)),
      el("td", c.passed ? "passed" : "FAILED", c.passed ? "promoted" : "failed")])), "no checks");
}

function pending(s) {
  $("pending-total").textContent = s.pending;
  fill("pending", ["task", "grader", "train", "held-out", "pending"], Object.entries(s.tasks).map(([name, t]) =>
    row([el("td", name), el("td", t.grader), num(t.train), num(t.heldout), num(t.pending)])), "no demonstrations yet");
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
// The loss per step as a polyline, the axes scaled to the steps so far (redrawn at every poll). A long round
// is thinned to about 1000 points (the chart is 640 px wide), and maxima are a loop, not Math.max(...spread),
// which overflows the call stack at some 100k steps.
function curve(all) {
  const every = Math.ceil(all.length / 1000), points = all.filter((p, i) => i % every === 0 || i === all.length - 1);
  let maxStep = 1, maxLoss = 1e-9;
  for (const p of all) { maxStep = Math.max(maxStep, p.step); maxLoss = Math.max(maxLoss, p.loss); }
  const W = 640, H = 220, L = 52, B = 26;
  const x = (step) => L + (W - L - 12) * step / maxStep, y = (loss) => H - B - (H - B - 10) * loss / maxLoss;
  const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  chart.append(
    svg("path", { d: `M${L} 10V${H - B}H${W - 12}`, fill: "none", stroke: "#999" }),
    svg("polyline", { points: points.map((p) => x(p.step).toFixed(1) + "," + y(p.loss).toFixed(1)).join(" "),
      fill: "none", stroke: "#1f5fbf", "stroke-width": 2 }),
    svg("text", { x: L - 6, y: 14, "text-anchor": "end" }, maxLoss.toPrecision(3)),
    svg("text", { x: L - 6, y: H - B, "text-anchor": "end" }, "0"),
    svg("text", { x: L, y: H - 8 }, "loss"),
    svg("text", { x: W - 12, y: H - 8, "text-anchor": "end" }, "step " + maxStep));
  return chart;
}

function training(s) {
  const round = s.rounds.filter((r) => r.stage !== "done").pop();
  if (!s.training || !round) {
    $("training").replaceChildren(el("p", s.round_running ? "a round is starting" : "no round running", "note"));
    return;
  }
  const points = s.training.filter((p) => typeof p.step === "number" && typeof p.loss === "number");
  const last = points[points.length - 1];
  const text = "round " + round.number + " (from v" + round.parent_version + "), " + round.stage + " stage"
    + (last ? ": step " + last.step + ", loss " + last.loss.toFixed(4) : ": no step yet");
  $("training").replaceChildren(el("p", text), ...(points.length ? [curve(points)] : []));
}

function render(s) {
  $("served-version").textContent = s.served_version;
  $("current-version").textContent = s.current_version;
  $("method").textContent = s.method;
  $("base-model").textContent = s.base_model;
  $("workspace").textContent = s.workspace;
  training(s); matrix(s); versions(s); decision(s); pending(s);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// Polled, not pushed: one request every 2 s after the previous answer, so a slow server is never queued up.
// The path is relative, so the page also works behind a proxy that serves it under a prefix.
async function poll() {
  try {
    const answer = await fetch("v1/status", { cache: "no-store" });
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    $("error").hidden = true;
  } catch (e) {
    $("error").textContent = "could not read v1/status (" + e.message + "); showing the last answer";
    $("error").hidden = false;
  }
  setTimeout(poll, 2000);
}
poll();
"""

BODY = """
<h1>selfdistill learner</h1>
<p class="meta">served version <b id="served-version">?</b> &middot; learner's current version
<b id="current-version">?</b> &middot; method <span id="method"></span> &middot; base model
<span id="base-model"></span></p>
<p class="note"><span id="workspace"></span> &middot; <span id="updated">loading</span></p>
<p id="error" hidden></p>
<h2>Training</h2>
<div id="training"><p class="note">no round running</p></div>
<h2>Accuracy over rounds</h2>
<p class="note">Held-out score per task of the version served when each round started, and of the candidate
it trained. A rejected candidate (red) was never served.</p>
<table id="matrix"></table>
<h2>Versions</h2>
<table id="versions"></table>
<h2>Last gate decision</h2>
<p id="decision-summary" class="note"></p>
<table id="decision"></table>
<h2>Pending demonstrations: <span id="pending-total">?</span></h2>
<p class="note">Training demonstrations no round has taken yet, per task.</p>
<table id="pending"></table>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>selfdistill learner</title>'
    f"<style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>\n"
)
# Only this page's script and style (their hashes) and fetches to this server; nothing else loads or runs.
POLICY = (
    f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def register_dashboard(app: FastAPI) -> None:
    """Add `GET /`, the dashboard page, to the server's application."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-store"})
