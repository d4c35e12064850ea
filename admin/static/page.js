// rolegate's live page: polls /api/page every second and redraws. No build
// step, no external assets.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function fmtTime(s) {
  if (!s || s.startsWith("0001-")) return "";
  const d = new Date(s);
  const pad = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
    d.toLocaleTimeString([], { hour12: false });
}

function ago(s, now) {
  const sec = Math.max(0, Math.round((now - new Date(s)) / 1000));
  if (sec < 60) return sec + "s ago";
  if (sec < 3600) return Math.floor(sec / 60) + "m ago";
  return Math.floor(sec / 3600) + "h " + Math.floor((sec % 3600) / 60) + "m ago";
}

function setStatus(kind, text) {
  const s = $("status");
  s.className = "status " + kind;
  s.textContent = text;
  document.body.classList.toggle("disconnected", kind === "disconnected");
}

function renderRoles(roles) {
  const box = $("roles");
  if (!roles.length) { box.replaceChildren(el("p", { class: "muted" }, "No roles yet.")); return; }
  // A role without a known limit is drawn on a common scale (at least 10
  // sessions) over a striped track, so a full bar always means a full limit.
  const used = (r) => r.sessions + (r.sessions_elsewhere || 0) + r.waiting;
  const scale = Math.max(10, ...roles.map(used));
  box.replaceChildren(...roles.map((r) => {
    const elsewhere = r.sessions_elsewhere || 0;
    const total = r.limit != null ? Math.max(r.limit, used(r), 1) : scale;
    const pct = (n) => (100 * n / total).toFixed(2) + "%";
    const bar = el("div", { class: r.limit != null ? "bar" : "bar unlimited",
      title: r.role + (r.limit != null ? ": limit " + r.limit + " from " + r.limit_source : ": no limit known") });
    if (r.sessions) bar.append(el("div", { class: "held", style: "width:" + pct(r.sessions) }, r.sessions));
    if (elsewhere) bar.append(el("div", { class: "elsewhere", style: "width:" + pct(elsewhere) }, elsewhere));
    if (r.waiting) bar.append(el("div", { class: "waiting", style: "width:" + pct(r.waiting) }, r.waiting));
    if (r.limit != null && r.limit > used(r))
      bar.append(el("div", { class: "free", style: "width:" + pct(r.limit - used(r)) }));
    const ev = r.policies.reduce((a, p) => a + p.evictions, 0);
    const rej = r.policies.reduce((a, p) => a + p.rejections, 0);
    const policy = r.limit != null && r.policy ? r.policy + (r.policy_source ? " (" + r.policy_source + ")" : "")
      : "no limit";
    const limit = r.limit != null ? " of " + r.limit + " (" + r.limit_source + ")" : "";
    // A role whose eviction budget is spent evicts in a loop: say so, with
    // the clients doing it. A paused or disabled role says that too.
    const flags = [];
    if (r.thrashing) flags.push(el("span", { class: "flag thrashing", title: "eviction budget spent by " +
      (r.evictors || []).join(", ") }, "thrashing"));
    if (r.paused) flags.push(el("span", { class: "flag paused" }, "paused"));
    if (r.disabled) flags.push(el("span", { class: "flag disabled" }, "disabled"));
    const dry = r.policies.reduce((a, p) => a + p.dry_run_evictions + p.dry_run_rejections + p.dry_run_waits, 0);
    return el("div", { class: "role" + (r.thrashing ? " thrashing" : ""), "data-role": r.role },
      el("div", { class: "name", title: r.role }, r.role, ...flags),
      bar,
      el("div", { class: "nums" },
        r.sessions + " via rolegate + " + elsewhere + " elsewhere" + limit + ", " + r.waiting + " waiting",
        el("br"),
        el("span", { class: "muted" }, policy + " · " + ev + " evicted · " + rej + " rejected" +
          (dry ? " · " + dry + " dry-run decisions" : "") +
          (r.thrashing && r.evictors ? " · thrashing: " + r.evictors.join(", ") : ""))));
  }));
}

// A login in flight has no pid before the server sent one, and no role or
// database before the client proved who it is (rolegate does not show what
// an unauthenticated client claims); a waiting one says what it waits for.
function renderSessions(sessions, unlisted, now) {
  $("session-count").textContent = "(" + (sessions.length + unlisted) + ")";
  $("unlisted").textContent = unlisted ?
    unlisted + " more connections that have not authenticated yet are not listed." : "";
  const body = $("sessions").tBodies[0];
  if (!sessions.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No sessions."))); return; }
  body.replaceChildren(...sessions.map((s) => el("tr", { "data-pid": s.pid, "data-via": s.via_rolegate ? "rolegate" : "elsewhere",
      "data-state": s.state },
    el("td", { class: "num" }, s.pid || "—"),
    s.role ? el("td", {}, s.role) : el("td", { class: "muted" }, "(not authenticated)"), el("td", {}, s.database),
    el("td", {}, s.client_addr + (s.client_tls ? " (TLS)" : "")),
    el("td", { class: s.via_rolegate ? "" : "muted" }, s.via_rolegate ? "rolegate" : "elsewhere"),
    el("td", {}, s.state, s.wait ? el("div", { class: "muted wait" }, s.wait) : ""),
    el("td", { title: fmtTime(s.started) }, ago(s.started, now)))));
}

// wouldDo is a dry run's decision in words: "would evict".
function wouldDo(kind) {
  return "would " + ({ eviction: "evict", rejection: "reject", wait: "wait" }[kind] || kind);
}

function renderEvents(events) {
  const body = $("events").tBodies[0];
  if (!events.length) { body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "None yet."))); return; }
  body.replaceChildren(...events.map((e) => {
    let victim = "";
    if (e.victim_pid) {
      victim = "pid " + e.victim_pid + (e.victim_role ? " (" + e.victim_role + ")" : "");
      victim += e.via_rolegate ? (e.victim_client ? " " + e.victim_client : "") : " outside rolegate";
      if (e.victim_application_name) victim += " [" + e.victim_application_name + "]";
    }
    return el("tr", { "data-kind": e.kind, "data-dry-run": e.dry_run ? "true" : "false" },
      el("td", { class: "time" }, fmtTime(e.time)), el("td", {}, e.instance || ""),
      el("td", { class: "kind " + e.kind + (e.dry_run ? " dry-run" : "") }, e.dry_run ? wouldDo(e.kind) + " (dry run)" : e.kind),
      el("td", {}, e.role || ""), el("td", {}, victim),
      el("td", {}, (e.policy || "") + (e.scope ? " (" + e.scope + ")" : "")), el("td", {}, e.reason || ""));
  }));
}

let failures = 0;

async function poll() {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 3000);
  try {
    const resp = await fetch("/api/page", { cache: "no-store", signal: ctl.signal });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const p = await resp.json();
    const now = new Date(p.taken);
    renderRoles(p.roles || []);
    renderSessions(p.sessions || [], p.unlisted || 0, now);
    renderEvents(p.events || []);
    failures = 0;
    setStatus("live", "live");
    $("updated").textContent = "updated " + now.toLocaleTimeString([], { hour12: false }) +
      (p.limits ? "" : " · no limits enforced");
  } catch (err) {
    failures++;
    setStatus("disconnected", "disconnected — " + (err.name === "AbortError" ? "timed out" : err.message) +
      " (retrying)");
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
