// rolegate's live page, over time: polls /api/history once per sample
// interval (at most once a second) and draws, per role, its sessions via
// rolegate, elsewhere and waiting logins stacked as steps, its limit as a
// dashed line, and the evictions, rejections, kills and dry-run decisions
// between samples as marks along the top (hollow: a dry run, not carried
// out). Times are the server's: the right edge is its "taken", never this
// browser's clock. Plain SVG, no libraries.
"use strict";

(() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 96, BAND = 14; // the marks' band at the top; the series below it
  const SERIES = ["via", "elsewhere", "waiting"]; // stacked bottom up
  const MARK_NAMES = { eviction: "eviction", rejection: "rejection", kill: "kill", wait: "wait" };

  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) e.append(c);
    return e;
  }

  function html(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  const clock = (t) => new Date(t).toLocaleTimeString([], { hour12: false });

  function span(seconds) {
    if (seconds >= 3600 && seconds % 3600 === 0) return seconds / 3600 + " h";
    if (seconds >= 60) return Math.round(seconds / 60) + " min";
    return (seconds < 10 ? +seconds.toFixed(1) : Math.round(seconds)) + " s";
  }

  // A mark's shape by kind, centred on x, y; hollow for a dry run (CSS).
  function markShape(kind, x, y, r) {
    switch (kind) {
      case "rejection": return svg("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r });
      case "kill": return svg("polygon", { points: `${x},${y - r - 1} ${x + r + 1},${y} ${x},${y + r + 1} ${x - r - 1},${y}` });
      case "wait": return svg("polygon", { points: `${x - r},${y - r} ${x + r},${y - r} ${x},${y + r}` });
      default: return svg("circle", { cx: x, cy: y, r: r });
    }
  }

  function chart(r, h) {
    const interval = h.interval_seconds * 1000;
    const end = new Date(h.taken).getTime();
    const start = end - h.points * interval;
    const x = (t) => Math.max(0, Math.min(W, (W * (t - start)) / (end - start)));
    const pts = r.points.map((p) => ({
      t: new Date(p.t).getTime(), v: [p.via_rolegate, p.elsewhere, p.waiting], limit: p.limit,
    }));
    const top = Math.max(1, ...pts.map((p) => p.v[0] + p.v[1] + p.v[2]), ...pts.map((p) => p.limit || 0));
    const y = (n) => (H - 1 - ((H - BAND - 4) * n) / top).toFixed(1);
    const chartSVG = svg("svg", { class: "history", "data-role": r.role, "data-points": pts.length,
      viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `${r.role}: sessions over the last ${span(h.points * h.interval_seconds)}` });
    chartSVG.append(svg("rect", { class: "frame", x: 0, y: BAND, width: W, height: H - BAND }));

    // Each sample's counts hold until the next sample (or one interval).
    const steps = (f) => {
      const out = [];
      pts.forEach((p, i) => {
        const x1 = x(p.t), x2 = x(i + 1 < pts.length ? pts[i + 1].t : p.t + interval);
        out.push(`${x1.toFixed(1)},${f(p)}`, `${x2.toFixed(1)},${f(p)}`);
      });
      return out;
    };
    SERIES.forEach((name, k) => {
      const upper = steps((p) => y(p.v.slice(0, k + 1).reduce((a, b) => a + b, 0)));
      const lower = steps((p) => y(p.v.slice(0, k).reduce((a, b) => a + b, 0))).reverse();
      chartSVG.append(svg("polygon", { class: "series " + name, points: upper.concat(lower).join(" ") }));
    });
    // The limit, dashed, where there is one.
    let run = [];
    const flush = () => {
      if (run.length) chartSVG.append(svg("polyline", { class: "limit", points: run.join(" ") }));
      run = [];
    };
    pts.forEach((p, i) => {
      if (p.limit == null) { flush(); return; }
      const x2 = x(i + 1 < pts.length ? pts[i + 1].t : p.t + interval);
      run.push(`${x(p.t).toFixed(1)},${y(p.limit)}`, `${x2.toFixed(1)},${y(p.limit)}`);
    });
    flush();
    chartSVG.append(svg("text", { class: "axis", x: 2, y: BAND + 10 }, String(top)));

    for (const e of r.events) {
      const kind = MARK_NAMES[e.kind] || "other";
      const cx = x(new Date(e.t).getTime());
      const g = svg("g", { class: "mark " + kind + (e.dry_run ? " dry-run" : ""), "data-count": e.count },
        svg("title", {}, `${e.count} ${e.kind}${e.count > 1 ? "s" : ""}${e.dry_run ? " (dry run, not carried out)" : ""}` +
          `, the last at ${clock(e.t)}`),
        svg("line", { class: "tick", x1: cx, x2: cx, y1: BAND, y2: H }),
        markShape(kind, cx, BAND / 2, Math.min(6, 3 + Math.log2(e.count))));
      chartSVG.append(g);
    }
    return chartSVG;
  }

  // What the marks add up to, for the text beside the chart.
  function tally(r) {
    const n = {};
    for (const e of r.events) {
      const k = e.kind + (e.dry_run ? " (dry run)" : "");
      n[k] = (n[k] || 0) + e.count;
    }
    const parts = Object.entries(n).map(([k, c]) => c + " " + k);
    return parts.length ? parts.join(", ") : "no evictions or rejections";
  }

  function render(h) {
    const box = document.getElementById("history");
    const win = span(h.points * h.interval_seconds);
    document.getElementById("history-span").textContent = "(last " + win + ", a sample every " +
      span(h.interval_seconds) + ")";
    if (!h.roles.length) {
      box.replaceChildren(html("p", "muted", "No sessions or decisions in the last " + win + "."));
      return;
    }
    box.replaceChildren(...h.roles.map((r) => {
      const last = r.points[r.points.length - 1];
      const now = last ? last.via_rolegate + " via rolegate + " + last.elsewhere + " elsewhere" +
        (last.limit != null ? " of " + last.limit : "") + ", " + last.waiting + " waiting" : "";
      const name = html("div", "name");
      name.append(html("span", "", r.role));
      const axis = html("div", "axis muted");
      axis.append(html("span", "", "−" + win), html("span", "", "now"));
      const plot = html("div", "plot");
      plot.append(chart(r, h), axis);
      const nums = html("div", "nums", now);
      nums.append(document.createElement("br"), html("span", "muted", tally(r)));
      const row = html("div", "role hist");
      row.dataset.role = r.role;
      row.append(name, plot, nums);
      return row;
    }));
  }

  async function poll() {
    let next = 5000; // after a failure (page.js says disconnected)
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5000);
    try {
      const resp = await fetch("/api/history", { cache: "no-store", signal: ctl.signal });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const h = await resp.json();
      render(h);
      next = Math.max(1000, h.interval_seconds * 1000);
    } catch (err) {
      // The live page's status already tells about a lost connection.
    } finally {
      clearTimeout(timer);
      setTimeout(poll, next);
    }
  }

  poll();
})();
