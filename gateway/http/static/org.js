/* The org dashboard: balances, 30-day usage, top users, features, recent activity, usage
 * by model and the overage. */
"use strict";

(function () {
  const { el, fmt, pretty, table, dateLabel, daysBetween } = window.CG;
  const session = window.CG.session("creditgate.api_key");

  function kindBadge(kind) {
    return el("span", { class: "kind kind-" + kind, text: kind.replaceAll("_", " ") });
  }

  /* tokens_deducted is what left the balance; show the change to the balance instead. */
  function change(tokens) {
    if (tokens === 0) return "0";
    return (tokens > 0 ? "\u2212" : "+") + fmt(Math.abs(tokens));
  }

  function timeLabel(iso) {
    const d = new Date(iso);
    const day = d.toLocaleDateString("en-US", { timeZone: "UTC", month: "short", day: "numeric" });
    const time = d.toLocaleTimeString("en-GB", { timeZone: "UTC", hour: "2-digit", minute: "2-digit" });
    return day + " " + time;
  }

  function renderHeader(balance, todayIso) {
    document.getElementById("who").textContent = balance.org;
    document.getElementById("org-name").textContent = balance.org;
    document.getElementById("plan").textContent = pretty(balance.plan) + " plan";
    const left = daysBetween(todayIso, balance.refresh_at);
    document.getElementById("period").textContent =
      "Period " + balance.period + " · balances refresh " +
      dateLabel(balance.refresh_at, { year: "numeric", month: "short", day: "numeric" }) +
      " (in " + left + (left === 1 ? " day)" : " days)");
  }

  /* The caller's team, user and key caps (contract A10), as GET /balance reports them:
   * one row per level and capped bucket; hidden when the caller has none. */
  function renderLevels(balance) {
    const rows = [];
    for (const level of balance.levels || []) {
      for (const [bucket, b] of Object.entries(level.buckets)) {
        rows.push(Object.assign({ level: level.level, id: level.id, bucket }, b));
      }
    }
    document.getElementById("levels-panel").hidden = rows.length === 0;
    const tableEl = document.getElementById("levels");
    table(tableEl, [
      { label: "Level", value: (r) => pretty(r.level) },
      { label: "Id", value: (r) => r.id },
      { label: "Bucket", value: (r) => pretty(r.bucket) },
      { label: "Cap", num: true, value: (r) => fmt(r.cap) },
      { label: "Used", num: true, value: (r) => fmt(r.used) },
      { label: "Remaining", num: true, value: (r) => fmt(r.remaining) },
    ], rows, "No caps");
    tableEl.querySelectorAll("tbody tr").forEach((tr, i) => {
      if (!rows[i]) return;
      tr.dataset.level = rows[i].level;
      tr.dataset.bucket = rows[i].bucket;
    });
  }

  function renderWithoutStats(balance, reason) {
    renderHeader(balance, new Date().toISOString());
    window.CG.renderCards(document.getElementById("buckets"), balance, null);
    renderLevels(balance);
    const note = "Usage statistics are unavailable: " + reason;
    document.getElementById("chart").replaceChildren(el("div", { class: "empty", text: note }));
    for (const id of ["users", "features", "activity", "models"]) {
      table(document.getElementById(id), [{ label: "", value: () => "" }], [], note);
    }
  }

  async function render() {
    const [balance, statsResult, usageResult] = await Promise.allSettled([
      session.fetchJson("/balance"),
      session.fetchJson("/stats?days=30"),
      session.fetchJson("/usage?limit=10"),
    ]).then((results) => {
      // The balance is required; statistics need the ledger and degrade to a note.
      if (results[0].status === "rejected") throw results[0].reason;
      return [results[0].value, results[1], results[2]];
    });
    if (statsResult.status === "rejected" || usageResult.status === "rejected") {
      renderWithoutStats(balance, (statsResult.reason || usageResult.reason).message);
      return;
    }
    const stats = statsResult.value;
    const usage = usageResult.value;
    renderHeader(balance, stats.to);
    window.CG.renderCards(document.getElementById("buckets"), balance, stats.forecast);
    renderLevels(balance);

    const total = window.CG.barChart(document.getElementById("chart"), stats.by_day);
    const requests = stats.by_day.reduce((s, d) => s + d.requests, 0);
    document.getElementById("usage-total").textContent =
      fmt(total) + " tokens · " + fmt(requests) + " requests";

    const userTotal = stats.by_user.reduce((s, u) => s + u.tokens, 0) || 1;
    table(document.getElementById("users"), [
      { label: "User", value: (u) => u.user_id || "(org key)" },
      { label: "Tokens", num: true, value: (u) => fmt(u.tokens) },
      { label: "Share", value: (u) => window.CG.shareCell(u.tokens / userTotal) },
    ], stats.by_user.slice(0, 8), "No usage yet");

    table(document.getElementById("features"), [
      { label: "Feature", value: (f) => pretty(f.name) },
      { label: "Cost", num: true, value: (f) => fmt(f.cost) },
      { label: "Used (30 d)", num: true, value: (f) => fmt(f.tokens) },
      { label: "", value: (f) => f.allowed ? "" : el("span", { class: "kind", text: "not in plan" }) },
    ], Object.entries(balance.features).map(([name, f]) => {
      const used = stats.by_feature.find((x) => x.feature === name);
      return { name, cost: f.cost, allowed: f.allowed, tokens: used ? used.tokens : 0 };
    }));

    table(document.getElementById("activity"), [
      { label: "When (UTC)", nowrap: true, value: (r) => timeLabel(r.created_at) },
      { label: "Event", nowrap: true, value: (r) => kindBadge(r.kind) },
      { label: "Feature", value: (r) => r.feature || r.bucket ? pretty(r.feature || r.bucket) : "–" },
      { label: "User", value: (r) => r.user_id || "" },
      { label: "Model", value: (r) => r.model || "" },
      { label: "Change", num: true, value: (r) => change(r.tokens) },
      { label: "Overage", num: true, value: (r) => r.overage ? fmt(r.overage) : "" },
    ], usage.items, "No activity recorded yet");

    window.CG.modelTable(document.getElementById("models"), document.getElementById("overage"),
      stats.by_model, stats.overage, "30 days");

    document.getElementById("updated").textContent =
      "Usage statistics are updated by the sync job, usually within seconds.";
  }

  session.start(render);
})();
