/* The operator dashboard's actions on the organization shown (contracts A4, A10): change
 * its plan, grant tokens, create API keys (the new key shown once) and revoke them, create,
 * rename and delete teams, move users and keys between teams, set and clear caps.
 *
 * Every action is one call of the admin API with the session's token (CG.session: the
 * token lives in sessionStorage for this tab, sent as an Authorization header, never in a
 * URL); the page then reads back what changed from the API rather than guessing. Values
 * are inserted as text nodes or form properties only (CG.el), never as HTML. */
"use strict";

(function () {
  const { el, fmt, table } = window.CG;

  function byId(id) {
    return document.getElementById(id);
  }

  /* A path from segments, each percent-encoded: an id can never add a segment. */
  function path(...parts) {
    return "/" + parts.map((p) => encodeURIComponent(p)).join("/");
  }

  function capsText(caps) {
    const entries = Object.entries(caps || {});
    return entries.length ? entries.map(([b, v]) => b + ": " + v).join(", ") : "–";
  }

  /* "500" -> 500, "30%" -> "30%": the admin API's two spellings of a cap. */
  function capValue(text) {
    const value = text.trim();
    if (/^\d+$/.test(value)) return Number(value);
    return value;
  }

  function newReference() {
    if (window.crypto && crypto.randomUUID) return "dashboard-" + crypto.randomUUID();
    return "dashboard-" + Date.now() + "-" + Math.random().toString(16).slice(2);
  }

  window.CG.adminActions = function (session, onChanged) {
    const status = byId("action-status");
    const panel = byId("manage");
    const keyBox = byId("new-key");
    const keyValue = byId("new-key-value");
    let org = null;
    let teams = [];
    // The key just created, only until "Done" (or another org, or signing out): it is
    // never written to storage, a URL or an attribute, and dropped from the page after.
    let shownKey = null;

    function say(text, ok) {
      status.textContent = text;
      status.dataset.state = ok ? "ok" : "error";
    }

    /* Run one action: its message on success, the API's reason on failure; then reload
     * the org (cards, teams, keys) so the page shows what the API now says. */
    async function act(fn) {
      say("Working…", true);
      status.dataset.state = "busy";
      let message;
      try {
        message = await fn();
      } catch (err) {
        say(err.message, false);
        return;
      }
      if (message === null) return;
      await onChanged(org);
      say(message, true);
    }

    function dismissKey() {
      shownKey = null;
      keyValue.replaceChildren();
      keyBox.hidden = true;
    }

    function showKey(key) {
      shownKey = key;
      keyValue.textContent = key;
      keyBox.hidden = false;
    }

    function teamOptions(select, blank) {
      const current = select.value;
      select.replaceChildren(el("option", { value: "", text: blank }),
        ...teams.map((t) => el("option", { value: t.team, text: t.team })));
      if (teams.some((t) => t.team === current)) select.value = current;
    }

    function bucketOptions(select, buckets) {
      const current = select.value;
      select.replaceChildren(...buckets.map((b) => el("option", { value: b, text: b })));
      if (buckets.includes(current)) select.value = current;
    }

    function renderTeams() {
      const rows = teams.map((t) => {
        const name = el("input", { value: t.name, "data-role": "rename" });
        name.setAttribute("aria-label", "name of " + t.team);
        const save = el("button", { type: "button", class: "small", text: "Rename" });
        save.addEventListener("click", () => act(async () => {
          await session.send("PUT", path("orgs", org, "teams", t.team), { name: name.value });
          return "Team " + t.team + " renamed";
        }));
        const remove = el("button", { type: "button", class: "small danger", text: "Delete" });
        remove.addEventListener("click", () => act(async () => {
          if (!window.confirm("Delete team " + t.team + "? Its users and keys keep no team.")) {
            return null;
          }
          await session.send("DELETE", path("orgs", org, "teams", t.team));
          return "Team " + t.team + " deleted";
        }));
        return Object.assign({ nameInput: name, save, remove }, t);
      });
      table(byId("teams"), [
        { label: "Team", value: (t) => t.team },
        { label: "Name", value: (t) => el("span", { class: "rename" }, t.nameInput, " ", t.save) },
        { label: "Caps", value: (t) => capsText(t.caps) },
        { label: "Users", num: true, value: (t) => fmt(t.users) },
        { label: "Keys", num: true, value: (t) => fmt(t.keys) },
        { label: "", value: (t) => t.remove },
      ], rows, "No teams yet");
      byId("teams").querySelectorAll("tbody tr").forEach((tr, i) => {
        if (rows[i]) tr.dataset.team = rows[i].team;
      });
    }

    function renderKeys(items) {
      const rows = items.map((k) => {
        const extra = { move: null, revoke: null };
        if (!k.revoked_at) {
          const move = el("select", { "data-role": "move" });
          move.setAttribute("aria-label", "team of key " + k.id);
          teamOptions(move, "(no team)");
          move.value = k.team || "";
          move.addEventListener("change", () => act(async () => {
            await session.send("PATCH", path("keys", k.id), { team: move.value || null });
            return "Key " + k.id + (move.value ? " moved to " + move.value : " left its team");
          }));
          const revoke = el("button", { type: "button", class: "small danger", text: "Revoke" });
          revoke.addEventListener("click", () => act(async () => {
            if (!window.confirm("Revoke key " + k.id + "? Requests with it are refused.")) return null;
            await session.send("DELETE", path("keys", k.id));
            return "Key " + k.id + " revoked";
          }));
          Object.assign(extra, { move, revoke });
        }
        return Object.assign(extra, k);
      });
      table(byId("keys"), [
        { label: "Id", value: (k) => k.id },
        { label: "Prefix", value: (k) => k.prefix + "…" },
        { label: "User", value: (k) => k.user || "–" },
        { label: "Name", value: (k) => k.name || "" },
        { label: "Team", value: (k) => k.move || k.team || "–" },
        { label: "Caps", value: (k) => capsText(k.caps) },
        { label: "State", value: (k) => (k.revoked_at ? "revoked" : "active") },
        { label: "", value: (k) => k.revoke },
      ], rows, "No keys yet");
      byId("keys").querySelectorAll("tbody tr").forEach((tr, i) => {
        if (rows[i]) tr.dataset.key = rows[i].id;
      });
    }

    /* Show the actions for ``name`` (its detail from GET /admin/orgs/{org}). */
    async function load(name, detail) {
      if (name !== org) {
        dismissKey();
        say("", true);
      }
      org = name;
      byId("manage-org").textContent = name;
      byId("plan-name").placeholder = detail.plan;
      const buckets = Object.keys(detail.buckets);
      bucketOptions(byId("grant-bucket"), buckets);
      bucketOptions(byId("cap-bucket"), buckets);
      const [teamList, keyList] = await Promise.all([
        session.fetchJson(path("orgs", name, "teams")),
        session.fetchJson("/keys?org=" + encodeURIComponent(name)),
      ]);
      teams = teamList.items;
      renderTeams();
      renderKeys(keyList.items);
      teamOptions(byId("user-team"), "(no team)");
      teamOptions(byId("key-team"), "(no team)");
      panel.hidden = false;
    }

    function hide() {
      dismissKey();
      org = null;
      panel.hidden = true;
    }

    function onSubmit(id, fn) {
      byId(id).addEventListener("submit", (event) => {
        event.preventDefault();
        if (org) act(fn);
      });
    }

    onSubmit("plan-form", async () => {
      const plan = byId("plan-name").value.trim();
      const result = await session.send("PUT", path("orgs", org), { plan });
      byId("plan-name").value = "";
      return org + ": plan " + (result.previous_plan || "(new)") + " → " + result.plan;
    });

    onSubmit("grant-form", async () => {
      const bucket = byId("grant-bucket").value;
      const amount = Number(byId("grant-amount").value);
      const reference = byId("grant-reference").value.trim() || newReference();
      const result = await session.send("POST", path("orgs", org, "grants"),
        { bucket, amount, reference });
      byId("grant-amount").value = "";
      byId("grant-reference").value = "";
      return result.created
        ? "Granted " + fmt(amount) + " " + bucket + " tokens"
        : "Reference " + reference + " was already granted: nothing changed";
    });

    onSubmit("team-form", async () => {
      const team = byId("team-id").value.trim();
      const name = byId("team-name").value;
      // No name: the team keeps the one it has (a new one gets none).
      const result = await session.send("PUT", path("orgs", org, "teams", team),
        name ? { name } : {});
      byId("team-id").value = "";
      byId("team-name").value = "";
      return (result.created ? "Team created: " : "Team updated: ") + team;
    });

    onSubmit("user-form", async () => {
      const user = byId("user-id").value.trim();
      const team = byId("user-team").value || null;
      await session.send("PUT", path("orgs", org, "users", user), { team });
      byId("user-id").value = "";
      return "User " + user + (team ? " is in team " + team : " has no team");
    });

    onSubmit("key-form", async () => {
      const body = { org };
      const user = byId("key-user").value.trim();
      const name = byId("key-name").value.trim();
      const team = byId("key-team").value;
      if (user) body.user = user;
      if (name) body.name = name;
      if (team) body.team = team;
      const created = await session.send("POST", "/keys", body);
      byId("key-user").value = "";
      byId("key-name").value = "";
      showKey(created.key);
      return "Key " + created.id + " created: copy it now, it is shown once";
    });

    /* Set (value given) or clear (null) one bucket's cap of a team, user or key. */
    async function cap(value) {
      const level = byId("cap-level").value;
      const id = byId("cap-id").value.trim();
      const bucket = byId("cap-bucket").value;
      if (!id) throw new Error("Enter the id of the " + level);
      const caps = { [bucket]: value };
      if (level === "team") {
        // PUT creates a team: refuse a team the org does not have instead.
        if (!teams.some((t) => t.team === id)) throw new Error("No team " + id + " in " + org);
        await session.send("PUT", path("orgs", org, "teams", id), { caps });
      } else if (level === "user") {
        await session.send("PUT", path("orgs", org, "users", id), { caps });
      } else {
        await session.send("PATCH", path("keys", id), { caps });
      }
      return value === null
        ? "Cap of " + level + " " + id + " on " + bucket + " cleared"
        : "Cap of " + level + " " + id + " on " + bucket + " set to " + value;
    }

    onSubmit("cap-form", async () => {
      const text = byId("cap-value").value.trim();
      if (!text) throw new Error("Enter a cap: N tokens or N%");
      return cap(capValue(text));
    });
    byId("cap-clear").addEventListener("click", () => {
      if (org) act(() => cap(null));
    });

    byId("new-key-copy").addEventListener("click", async () => {
      if (!shownKey) return;
      try {
        await navigator.clipboard.writeText(shownKey);
        say("Key copied to the clipboard", true);
      } catch (err) {
        say("Could not copy (" + err.message + "): select the key and copy it", false);
      }
    });
    byId("new-key-done").addEventListener("click", () => {
      dismissKey();
      say("The key is no longer shown", true);
    });
    byId("signout").addEventListener("click", hide);

    return { load, hide };
  };
})();
