/* The operator dashboard: totals, usage per day, feature and model, top spenders and
 * users; the organization shown can be acted on (admin_actions.js). */
"use strict";

(function () {
  const { el, fmt, pretty, table } = window.CG;
  const session = window.CG.session("creditgate.admin_token");
  // After an action, the org is read again: its cards, teams and keys as the API has them.
  const actions = window.CG.adminActions(session, (org) => showOrg(org));

  function tile(label, value, key) {
    return el("div", { class: "tile", "data-tile": key },
      el("div", { class: "label", text: label }),
      el("div", { class: "value", text: value }));
  }

  async function showOrg(org) {
    const head = document.getElementById("org-detail-head");
    const cards = document.getElementById("org-buckets");
    document.getElementById("org-input").value = org;
    for (const row of document.querySelectorAll("#spenders tbody tr")) {
      row.classList.toggle("selected", row.dataset.org === org);
    }
    try {
      const detail = await session.fetchJson("/orgs/" + encodeURIComponent(org));
      head.textContent = detail.org + " · " + detail.plan + " plan · period " + detail.period +
        " · " + detail.keys.length + (detail.keys.length === 1 ? " active key" : " active keys");
      window.CG.renderCards(cards, detail, null);
      await actions.load(org, detail);
    } catch (err) {
      head.textContent = err.status === 404 ? "No organization " + org : err.message;
      cards.replaceChildren();
      actions.hide();
    }
  }

  async function render() {
    const [spenders, usage] = await Promise.all([
      session.fetchJson("/orgs?sort=spend&limit=10"),
      session.fetchJson("/usage?days=30&limit=10"),
    ]);
    document.getElementById("who").textContent = "operator";
    document.getElementById("period").textContent =
      "This period from " + spenders.from + " · usage window " + usage.from + " to " + usage.to;

    const top = usage.by_feature[0];
    document.getElementById("tiles").replaceChildren(
      tile("Tokens, 30 days", fmt(usage.totals.tokens), "tokens"),
      tile("Requests, 30 days", fmt(usage.totals.requests), "requests"),
      tile("Active organizations", fmt(usage.totals.orgs), "orgs"),
      tile("Top feature", top ? pretty(top.feature) : "–", "feature"));

    const total = window.CG.barChart(document.getElementById("chart"), usage.by_day);
    document.getElementById("usage-total").textContent = fmt(total) + " tokens";
    window.CG.hbars(document.getElementById("features"), usage.by_feature, "feature");
    window.CG.modelTable(document.getElementById("models"), document.getElementById("overage"),
      usage.by_model, usage.overage, "30 days");

    const spent = spenders.items.map((o) => Object.assign({ __onclick: () => showOrg(o.org), __key: o.org }, o));
    table(document.getElementById("spenders"), [
      { label: "Organization", value: (o) => o.org },
      { label: "Plan", value: (o) => o.plan || "" },
      { label: "Tokens", num: true, value: (o) => fmt(o.tokens) },
      { label: "Requests", num: true, value: (o) => fmt(o.requests) },
      // Each org's own period (anchored periods start on the org's own day).
      { label: "Period from", value: (o) => o.from },
    ], spent, "No usage this period");

    table(document.getElementById("users"), [
      { label: "Organization", value: (u) => u.org },
      { label: "User", value: (u) => u.user_id || "(org key)" },
      { label: "Tokens", num: true, value: (u) => fmt(u.tokens) },
      { label: "Share of org", value: (u) => window.CG.shareCell(u.share) },
    ], usage.by_user, "No usage yet");

    if (spenders.items.length && !document.getElementById("org-input").value) {
      await showOrg(spenders.items[0].org);
    }
  }

  document.getElementById("org-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const org = document.getElementById("org-input").value.trim();
    if (org) showOrg(org);
  });

  session.start(render);
})();
