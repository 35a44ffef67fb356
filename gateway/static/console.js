// The operator console (gateway/console.py): polls GET /admin/api/state about once a
// second and redraws. Everything from the server is put in the page as text
// (textContent), never parsed as markup. No framework, no build step.
"use strict";

const POLL_MS = 1000;
const EVENTS_PER_SHARD = 12;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function clock(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
}

function seconds(x) {
  return x === null || x === undefined ? "–" : `${Number(x).toFixed(2)} s`;
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

// -- the region map ----------------------------------------------------------------------

function copyCard(shard, c) {
  const roleLabel = c.mapRole === "primary" ? "PRIMARY" : "replica";
  const facts = [
    ["database", c.agentReachable ? (c.running ? (c.role || "starting") : "stopped") : "agent unreachable"],
    ["health", c.health],
    ["epoch", c.epoch === null ? "–" : `${c.epoch}${c.epoch !== shard.epoch ? ` (map ${shard.epoch})` : ""}`],
    ["timeline", c.timeline ?? "–"],
  ];
  if (c.mapRole === "replica") {
    facts.push(["lag", bytes(c.lagBytes)]);
    facts.push(["streaming", c.streaming ? "yes" : "no"]);
  }
  facts.push(["lsn", c.lsn || "–"]);
  return el("div", {
    class: `copy state-${c.state} role-${c.mapRole}`,
    "data-shard": shard.name, "data-copy": c.key, "data-role": c.mapRole,
    "data-state": c.state, "data-health": c.health, "data-epoch": c.epoch ?? "",
  },
    el("div", { class: "copy-head" },
      el("span", { class: "copy-key" }, c.key),
      el("span", { class: "badge" }, roleLabel),
      c.syncStandby ? el("span", { class: "badge sync", title: "in the synchronous standby set" }, "sync") : null),
    el("div", { class: "copy-state" }, c.state),
    el("dl", {}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])));
}

function shardHeader(shard) {
  const t = shard.transition;
  return el("div", { class: "shard-head", "data-shard": shard.name, "data-primary": shard.primary, "data-epoch": shard.epoch },
    el("div", { class: "shard-name" }, shard.name),
    el("div", {}, "primary ", el("strong", { class: "primary-name" }, shard.primary)),
    el("div", {}, `epoch ${shard.epoch}`),
    el("div", { class: "muted" }, `sync ${shard.syncMode}: ${shard.syncStandbys.join(", ") || "none"}`),
    el("div", { class: "muted" }, `${shard.events} event${shard.events === 1 ? "" : "s"} placed`),
    t ? el("div", { class: "transition" }, `${t.kind} → ${t.target} (${t.ageSeconds}s, writes held)`) : null);
}

function renderMap(state) {
  const map = document.getElementById("map");
  const regions = state.regions.map((r) => r.name);
  map.style.setProperty("--regions", String(Math.max(regions.length, 1)));
  const cells = [el("div", { class: "corner" }, "shard \\ region")];
  for (const r of state.regions) {
    cells.push(el("div", { class: "region-head", "data-region": r.name },
      el("div", { class: "region-name" }, r.name),
      el("div", { class: "muted" }, r.location || ""),
      r.name === state.gateway.region ? el("div", { class: "here" }, "this gateway") : null));
  }
  for (const shard of state.shards) {
    cells.push(shardHeader(shard));
    for (const region of regions) {
      const copies = shard.copies.filter((c) => c.region === region);
      cells.push(el("div", { class: "cell", "data-shard": shard.name, "data-region": region },
        copies.length ? copies.map((c) => copyCard(shard, c)) : el("div", { class: "muted" }, "no copy")));
    }
  }
  if (!state.shards.length) cells.push(el("div", { class: "muted" }, "The map has no shards (or is not loaded yet)."));
  map.replaceChildren(...cells);
}

// -- operations, controller, events, drills ---------------------------------------------------

function renderOperations(state) {
  const box = document.getElementById("operations");
  if (!state.operations.length) {
    box.replaceChildren(el("p", { class: "muted", id: "no-operations" }, "Nothing in progress: no transition, no journal, no operation lease held."));
    return;
  }
  box.replaceChildren(table(["shard", "operation", "from → to", "phase / holder", "since", "source"],
    state.operations.map((op) => [
      op.shard, op.op,
      op.source === "lease" ? "–" : `${op.from ?? "?"} → ${op.target ?? "?"}${op.newEpoch ? ` (epoch ${op.fromEpoch} → ${op.newEpoch})` : ""}`,
      op.source === "lease" ? op.holder : `${op.phase ?? "?"}${op.repointed && op.repointed.length ? `; repointed ${op.repointed.join(", ")}` : ""}`,
      op.ageSeconds !== undefined ? `${op.ageSeconds}s` : clock(op.startedAt),
      op.source === "map" ? "map transition" : op.source === "journal" ? `journal ${op.id}` : "operation lease",
    ])));
  box.firstChild.setAttribute("id", "operations-table");
}

function renderController(state) {
  const box = document.getElementById("controller");
  const c = state.controller;
  if (!c) {
    box.replaceChildren(el("p", { class: "muted" }, "The controller lock could not be read."));
    return;
  }
  if (!c.active) {
    box.replaceChildren(el("p", { class: "warn" }, c.detail || "No active failover controller."));
    return;
  }
  const parts = [el("p", {}, "active: ", el("strong", {}, c.active),
    c.inProgress && c.inProgress.length ? ` · promoting ${c.inProgress.join(", ")}` : " · idle",
    c.suspects && Object.keys(c.suspects).length ? ` · suspects: ${Object.keys(c.suspects).join(", ")}` : "",
    c.detail ? ` · ${c.detail}` : "")];
  if (c.lastError) parts.push(el("p", { class: "warn" }, `last error: ${c.lastError}`));
  box.replaceChildren(...parts);
}

function renderEvents(state) {
  const box = document.getElementById("events");
  const byShard = new Map(state.shards.map((s) => [s.name, []]));
  for (const e of state.events) {
    if (!byShard.has(e.shard)) byShard.set(e.shard, []);
    byShard.get(e.shard).push({ at: e.at, text: e.text });
  }
  const history = (state.controller && state.controller.history) || [];
  for (const h of history) {
    if (!byShard.has(h.shard)) byShard.set(h.shard, []);
    byShard.get(h.shard).push({
      at: h.promotedAt || h.decidedAt || h.detectedAt,
      text: `controller ${h.kind}: ${h.oldPrimary || "?"} → ${h.target || "?"} ${h.outcome}` +
        (h.totalSeconds !== null && h.totalSeconds !== undefined ? ` in ${seconds(h.totalSeconds)}` : ""),
    });
  }
  const columns = [];
  for (const [shard, list] of byShard) {
    list.sort((a, b) => String(b.at).localeCompare(String(a.at)));
    columns.push(el("div", { class: "event-list", "data-shard": shard },
      el("h3", {}, shard),
      list.length ? el("ol", {}, list.slice(0, EVENTS_PER_SHARD).map((e) => el("li", {}, el("time", {}, clock(e.at)), " ", e.text)))
        : el("p", { class: "muted" }, "No change seen since this gateway started watching.")));
  }
  box.replaceChildren(...columns);
}

function renderDrills(state) {
  const box = document.getElementById("drills");
  if (!state.drills.length) {
    box.replaceChildren(el("p", { class: "muted", id: "no-drills" }, state.drillsSaved
      ? "No drill report saved yet: `boxoffice drill failover` keeps its report here."
      : "Drill reports could not be read now."));
    return;
  }
  box.replaceChildren(table(["started", "shard", "kind", "result", "primary", "detect", "promote", "writes back", "longest gap", "bookings"],
    state.drills.map((d) => [
      clock(d.startedAt), d.shard, `${d.kind} (${d.mode})`,
      el("span", { class: d.ok ? "ok" : "bad" }, d.ok ? "OK" : "FAILED"),
      `${d.oldPrimary} → ${d.newPrimary} (epoch ${d.oldEpoch} → ${d.newEpoch})`,
      seconds(d.detectSeconds), seconds(d.promoteSeconds), seconds(d.writesBackSeconds), seconds(d.longestGapSeconds),
      `${d.confirmed ?? "?"} confirmed, ${d.missing ?? "?"} missing, ${d.oversold ?? "?"} oversold, ${d.duplicatedReferences ?? "?"} duplicated`,
    ])));
}

function renderStatus(state) {
  const g = state.gateway;
  const status = document.getElementById("status");
  status.dataset.live = "live";
  status.textContent = `gateway ${g.region} · map index ${g.mapIndex ?? "–"} · ` +
    `Consul ${g.consulReachable ? "reachable" : "UNREACHABLE (last map kept)"} · updated ${clock(state.generatedAt)}`;
  document.getElementById("errors").replaceChildren(...state.errors.map((e) => el("p", { class: "warn" }, `could not read ${e}`)));
}

function render(state) {
  renderStatus(state);
  renderMap(state);
  renderOperations(state);
  renderController(state);
  renderEvents(state);
  renderDrills(state);
  window.consoleRounds = (window.consoleRounds || 0) + 1;
}

function signedOut() {
  const status = document.getElementById("status");
  status.dataset.live = "signed-out";
  status.replaceChildren("Signed out or session expired: ", el("a", { href: "/operator/login" }, "sign in"));
}

async function tick() {
  try {
    const resp = await fetch("/admin/api/state", { cache: "no-store", credentials: "same-origin" });
    if (resp.status === 401 || resp.status === 403) {
      signedOut();
      return; // no more polling without a session
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.dataset.live = "stale";
    status.textContent = `not updating (${e.message}); retrying…`;
  }
  setTimeout(tick, POLL_MS);
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/admin/logout", { method: "POST", credentials: "same-origin" }).catch(() => null);
  location.assign("/operator/login");
});

tick();
