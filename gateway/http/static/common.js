/* creditgate dashboards: shared helpers (sign-in, fetch, cards, charts, tables).
 * Plain browser JavaScript, no dependencies. Data is always inserted as text nodes,
 * never as HTML, so nothing an API returns can inject markup. */
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const numberFormat = new Intl.NumberFormat("en-US");

  /* Progress-bar levels: amber under 25% left, red under 10% left (contract A4). */
  const WARN_BELOW = 25;
  const LOW_BELOW = 10;

  function levelOf(percentLeft) {
    if (percentLeft < LOW_BELOW) return "low";
    if (percentLeft < WARN_BELOW) return "warn";
    return "ok";
  }

  /* Share of the bucket still available: plan tokens left plus purchased ones, over the
   * period's allocation plus the purchased tokens. */
  function percentLeft(bucket) {
    const capacity = bucket.allocated + bucket.extra;
    if (capacity <= 0) return 0;
    return Math.max(0, Math.min(100, (bucket.available * 100) / capacity));
  }

  function fmt(n) {
    return n === null || n === undefined ? "–" : numberFormat.format(n);
  }

  function pretty(name) {
    if (!name) return "(none)";
    const s = String(name).replace(/_/g, " ");
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function dateLabel(iso, opts) {
    const d = new Date(iso.length === 10 ? iso + "T00:00:00Z" : iso);
    return d.toLocaleDateString("en-US", Object.assign({ timeZone: "UTC" }, opts));
  }

  function daysBetween(fromIso, toIso) {
    const a = Date.parse(fromIso.slice(0, 10) + "T00:00:00Z");
    const b = Date.parse(toIso.slice(0, 10) + "T00:00:00Z");
    return Math.round((b - a) / 86400000);
  }

  /* ---- session: the credential lives in sessionStorage, for this tab only ---- */

  function session(storageKey) {
    const api = document.body.dataset.api;
    const login = document.getElementById("login");
    const app = document.getElementById("app");
    const signout = document.getElementById("signout");
    const form = document.getElementById("login-form");
    const input = document.getElementById("key");
    const error = document.getElementById("login-error");
    let onReady = null;

    function token() {
      return sessionStorage.getItem(storageKey);
    }

    function showLogin(message) {
      app.hidden = true;
      signout.hidden = true;
      login.hidden = false;
      error.textContent = message || "";
      input.focus();
    }

    function showApp() {
      login.hidden = true;
      app.hidden = false;
      signout.hidden = false;
    }

    /* One call of the JSON API: the credential goes in the Authorization header only
     * (never a URL), no cookies, no referrer, nothing cached. */
    async function request(method, path, body) {
      const headers = { Authorization: "Bearer " + token(), Accept: "application/json" };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(api + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
      if (response.status === 401) {
        sessionStorage.removeItem(storageKey);
        const err = new Error("unauthenticated");
        err.status = 401;
        throw err;
      }
      if (response.status === 204) return null;
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        const err = new Error(answer.detail || answer.title || "HTTP " + response.status);
        err.status = response.status;
        err.body = answer;
        throw err;
      }
      return answer;
    }

    function fetchJson(path) {
      return request("GET", path);
    }

    async function load() {
      try {
        await onReady();
        showApp();
        document.body.dataset.ready = "1";
      } catch (err) {
        if (err.status === 401) showLogin("That credential was not accepted.");
        else showLogin("Could not load the dashboard: " + err.message);
      }
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(storageKey, value);
      input.value = "";
      load();
    });
    signout.addEventListener("click", () => {
      sessionStorage.removeItem(storageKey);
      delete document.body.dataset.ready;
      showLogin();
    });

    return {
      fetchJson,
      send: request,
      start(render) {
        onReady = render;
        if (token()) load();
        else showLogin();
      },
    };
  }

  /* ---- bucket cards ---- */

  function forecastText(f) {
    if (!f || f.days_left === null) return ["No usage in the last 7 days", false];
    const days = f.days_left < 10 ? f.days_left.toFixed(1) : Math.round(f.days_left);
    const text = "≈ " + days + " days left at " + fmt(f.burn_per_day) + "/day";
    return f.empties_before_refresh ? [text + " · runs out before refresh", true] : [text, false];
  }

  function renderCards(container, balance, forecasts) {
    container.replaceChildren();
    for (const [name, b] of Object.entries(balance.buckets)) {
      const card = el("div", { class: "card", "data-bucket": name });
      if (!b.in_plan && b.extra <= 0) {
        card.classList.add("off");
        card.append(
          el("div", { class: "card-title" }, el("span", { text: pretty(name) })),
          el("div", { class: "card-amount" }, el("span", { class: "available", text: "0" })),
          el("div", { class: "bar" }, el("div", { class: "bar-fill level-low", "data-level": "low" })),
          el("div", { class: "forecast", text: "Not included in the " + balance.plan + " plan" })
        );
        container.append(card);
        continue;
      }
      const pct = percentLeft(b);
      const level = levelOf(pct);
      const fill = el("div", { class: "bar-fill level-" + level, "data-level": level });
      fill.style.width = pct.toFixed(1) + "%";
      const bar = el("div", { class: "bar", role: "progressbar" }, fill);
      bar.setAttribute("aria-valuenow", pct.toFixed(0));
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      card.dataset.level = level;
      card.dataset.percent = pct.toFixed(2);
      card.append(
        el("div", { class: "card-title" },
          el("span", { text: pretty(name) }),
          el("span", { class: "pct", text: Math.floor(pct) + "% left" })),
        el("div", { class: "card-amount" },
          el("span", { class: "available", text: fmt(b.available) }),
          el("span", { class: "of", text: "of " + fmt(b.allocated + b.extra) })),
        bar,
        el("div", { class: "card-meta" },
          el("span", { class: "used", text: "Used " + fmt(b.used) }),
          el("span", { text: b.extra > 0 ? "incl. " + fmt(b.extra) + " purchased" : "" }))
      );
      // Calls that cost more than the bucket could cover this period (recorded, not owed;
      // null when the ledger is not there to say).
      if (b.overage > 0) {
        card.append(el("div", { class: "overage overage-some", "data-overage": String(b.overage),
          text: "Overage " + fmt(b.overage) + " tokens this period" }));
      }
      if (forecasts) {
        const [text, urgent] = forecastText(forecasts[name]);
        card.append(el("div", { class: "forecast" + (urgent ? " urgent" : ""), text }));
      }
      container.append(card);
    }
  }

  /* ---- charts ---- */

  function niceStep(max, ticks) {
    const raw = Math.max(1, max) / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return Math.max(1, m * mag);
    return 10 * mag;
  }

  /* Tokens per day as columns, with a y grid and date labels. */
  function barChart(container, days) {
    container.replaceChildren();
    const total = days.reduce((s, d) => s + d.tokens, 0);
    const W = 720, H = 240, L = 44, R = 8, T = 10, B = 26;
    const max = Math.max(0, ...days.map((d) => d.tokens));
    const step = niceStep(max, 4);
    const top = Math.max(step, Math.ceil(max / step) * step);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "Tokens used per day" });
    for (let v = 0; v <= top; v += step) {
      const y = T + (H - T - B) * (1 - v / top);
      chart.append(svg("line", { class: "gridline", x1: L, x2: W - R, y1: y, y2: y }));
      chart.append(svg("text", { class: "axis", x: L - 6, y: y + 3, "text-anchor": "end" }, fmt(v)));
    }
    const slot = (W - L - R) / Math.max(1, days.length);
    const width = Math.max(2, slot * 0.7);
    days.forEach((d, i) => {
      const h = ((H - T - B) * d.tokens) / top;
      const x = L + i * slot + (slot - width) / 2;
      const rect = svg("rect", { class: "col", x: x.toFixed(1), y: (H - B - h).toFixed(1),
        width: width.toFixed(1), height: Math.max(0, h).toFixed(1), rx: 2, "data-day": d.day,
        "data-tokens": d.tokens });
      rect.append(svg("title", {}, `${dateLabel(d.day, { month: "short", day: "numeric" })}: ` +
        `${fmt(d.tokens)} tokens, ${fmt(d.requests)} requests`));
      chart.append(rect);
      const every = Math.ceil(days.length / 7);
      if (i % every === 0 || i === days.length - 1) {
        chart.append(svg("text", { class: "axis", x: (L + i * slot + slot / 2).toFixed(1),
          y: H - 8, "text-anchor": "middle" }, dateLabel(d.day, { month: "short", day: "numeric" })));
      }
    });
    container.append(chart);
    if (total === 0) container.append(el("div", { class: "empty", text: "No usage in this window yet" }));
    return total;
  }

  /* Horizontal bars: one labelled row per item (usage by feature). */
  function hbars(container, items, labelKey) {
    container.replaceChildren();
    if (!items.length) {
      container.append(el("div", { class: "empty", text: "No usage yet" }));
      return;
    }
    const max = Math.max(1, ...items.map((i) => i.tokens));
    const wrap = el("div", { class: "hbars" });
    for (const item of items) {
      const fill = el("div", { class: "bar-fill" });
      fill.style.width = ((item.tokens * 100) / max).toFixed(1) + "%";
      wrap.append(el("div", { class: "hbar", "data-key": item[labelKey] },
        el("div", { class: "hbar-label" },
          el("span", { text: pretty(item[labelKey]) }),
          el("span", { class: "num", text: fmt(item.tokens) + " tokens · " + fmt(item.requests) + " req" })),
        el("div", { class: "bar" }, fill)));
    }
    container.append(wrap);
  }

  /* A table from column specs: {label, value(row) -> string|Node, num?}. */
  function table(tableEl, columns, rows, emptyText) {
    tableEl.replaceChildren();
    const head = el("tr", {}, ...columns.map((c) => el("th", { class: c.num ? "num" : "", text: c.label })));
    const body = el("tbody");
    if (!rows.length) {
      body.append(el("tr", {}, el("td", { class: "empty", colSpan: columns.length,
        text: emptyText || "Nothing yet" })));
    }
    for (const row of rows) {
      const tr = el("tr");
      for (const c of columns) {
        const value = c.value(row);
        tr.append(el("td", { class: (c.num ? "num " : "") + (c.nowrap ? "nowrap" : "") }, value));
      }
      if (row.__onclick) tr.addEventListener("click", row.__onclick);
      if (row.__key) tr.dataset.org = row.__key;
      body.append(tr);
    }
    tableEl.append(el("thead", {}, head), body);
  }

  /* Usage by model (contract A8): the provider's token counts, what was charged, and the
   * overage; the head shows the window's total overage (red when there is some). */
  function modelTable(tableEl, overageEl, models, overage, windowText) {
    table(tableEl, [
      { label: "Model", value: (m) => m.model || "(none reported)" },
      { label: "Requests", num: true, value: (m) => fmt(m.requests) },
      { label: "Input", num: true, value: (m) => fmt(m.input_tokens) },
      { label: "Cached", num: true, value: (m) => fmt(m.cached_input_tokens) },
      { label: "Output", num: true, value: (m) => fmt(m.output_tokens) },
      { label: "Reasoning", num: true, value: (m) => fmt(m.reasoning_tokens) },
      { label: "Charged", num: true, value: (m) => fmt(m.tokens + m.overage) },
      { label: "Overage", num: true, value: (m) => fmt(m.overage) },
      { label: "Usage missing", num: true, value: (m) => fmt(m.usage_missing_requests) },
    ], models, "No requests priced by the call yet");
    for (const [i, row] of tableEl.querySelectorAll("tbody tr").entries()) {
      if (models[i]) row.dataset.model = models[i].model || "";
    }
    overageEl.textContent = "Overage " + fmt(overage) + " tokens · " + windowText;
    overageEl.dataset.overage = String(overage);
    overageEl.classList.toggle("overage-some", overage > 0);
  }

  function shareCell(share) {
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = (share * 100).toFixed(1) + "%";
    return el("div", { class: "share" }, el("div", { class: "bar" }, fill),
      el("span", { text: Math.round(share * 100) + "%" }));
  }

  window.CG = {
    levelOf, percentLeft, fmt, pretty, el, dateLabel, daysBetween,
    session, renderCards, barChart, hbars, table, shareCell, modelTable,
  };
})();
