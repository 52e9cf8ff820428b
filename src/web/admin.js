// confab's admin page: tenants, their limits, budgets and keys, usage per day (an SVG chart
// drawn here) and the audit log, all through /admin/v1 with an admin key. Plain JS, no build
// step, no third-party code (served by the binary; works air-gapped).
"use strict";

const PAGE = 50;
const DAYS = 30;

const state = {
  // Kept for this tab only: an admin key is the most powerful credential there is.
  key: sessionStorage.getItem("confab.admin.key") || "",
  tenants: [],
  tenantsOffset: 0,
  tenant: null, // the selected tenant
  auditOffset: 0,
};

// ---------- errors ----------

const FRIENDLY = {
  missing_api_key: "Paste an admin key first.",
  invalid_api_key: "The admin key was not accepted (wrong or revoked).",
  api_key_expired: "The admin key has expired.",
  forbidden: "That is a tenant key; the admin page needs an admin key (cfa_…).",
  conflict: "That name is taken.",
  tenant_not_found: "That tenant no longer exists.",
  validation_error: "Some value is not accepted.",
  database_unavailable: "The database is unavailable; try again shortly.",
};

function describe(err) {
  const code = err && err.code;
  let text = (err && err.message) || FRIENDLY[code] || "Something went wrong.";
  if (FRIENDLY[code] && err.message && !err.message.includes(FRIENDLY[code])) text = `${FRIENDLY[code]} ${err.message}`;
  return code ? `${text} [${code}]` : text;
}

function showError(err) {
  bannerError(err, describe);
}

// ---------- REST ----------

const api = (method, path, body) => request(state.key, method, path, body);

// ---------- small DOM helpers ----------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
}

function button(label, title, onclick, cls) {
  return el("button", { type: "button", title, "aria-label": title, class: cls || "", onclick }, label);
}

const when = (t) => (t ? new Date(t).toLocaleString() : "—");
const num = (n) => Number(n).toLocaleString();

// ---------- secrets (shown once) ----------

function showSecret(what, secret) {
  $("secret-what").textContent = what;
  $("secret-value").textContent = secret;
  $("secret").hidden = false;
}

$("secret-copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("secret-value").textContent);
    $("secret-copy").textContent = "Copied";
  } catch {
    // No clipboard (plain http on another host): select it for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($("secret-value"));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
});

$("secret-close").addEventListener("click", () => {
  $("secret").hidden = true;
  $("secret-value").textContent = "";
  $("secret-copy").textContent = "Copy";
});

// ---------- tenants ----------

function limitsText(l) {
  const parts = [];
  if (l.requests_per_minute) parts.push(`${num(l.requests_per_minute)} req/min`);
  if (l.ws_messages_per_second) parts.push(`${num(l.ws_messages_per_second)} msg/s`);
  if (l.max_connections) parts.push(`${num(l.max_connections)} sockets`);
  return parts.length ? parts.join(" · ") : "defaults";
}

function budgetsText(b) {
  const parts = [];
  if (b.tokens_per_day) parts.push(`${num(b.tokens_per_day)}/day`);
  if (b.tokens_per_month) parts.push(`${num(b.tokens_per_month)}/month`);
  if (b.user_tokens_per_day) parts.push(`user ${num(b.user_tokens_per_day)}/day`);
  if (b.user_tokens_per_month) parts.push(`user ${num(b.user_tokens_per_month)}/month`);
  return parts.length ? parts.join(" · ") : "none";
}

function renderTenants() {
  const body = $("tenants").tBodies[0];
  body.replaceChildren();
  for (const t of state.tenants) {
    const selected = state.tenant && state.tenant.id === t.id;
    const row = el(
      "tr",
      { "data-name": t.name, class: selected ? "current" : "" },
      el("td", {}, button(t.name, `Open ${t.name}`, () => selectTenant(t), "link")),
      el("td", { class: t.disabled ? "bad" : "" }, t.disabled ? `disabled ${when(t.disabled_at)}` : "enabled"),
      el("td", {}, String(t.active_keys)),
      el("td", {}, limitsText(t.limits)),
      el("td", {}, budgetsText(t.budgets)),
      el("td", {}, when(t.created_at)),
      el(
        "td",
        { class: "tools" },
        t.disabled
          ? button("Enable", `Enable ${t.name}`, () => setDisabled(t, false), "enable")
          : button("Disable", `Disable ${t.name}`, () => setDisabled(t, true), "disable"),
        button("Delete", `Delete ${t.name}`, () => deleteTenant(t), "delete danger"),
      ),
    );
    body.append(row);
  }
}

async function loadTenants(more) {
  const offset = more ? state.tenantsOffset : 0;
  const page = await api("GET", `/admin/v1/tenants?offset=${offset}&limit=${PAGE}`);
  state.tenants = more ? state.tenants.concat(page.tenants) : page.tenants;
  state.tenantsOffset = offset + page.tenants.length;
  $("more-tenants").hidden = !page.has_more;
  if (state.tenant) {
    const fresh = state.tenants.find((t) => t.id === state.tenant.id);
    if (fresh) state.tenant = fresh;
  }
  renderTenants();
}

function replaceTenant(t) {
  const i = state.tenants.findIndex((x) => x.id === t.id);
  if (i >= 0) state.tenants[i] = t;
  if (state.tenant && state.tenant.id === t.id) state.tenant = t;
  renderTenants();
}

async function act(work) {
  clearError();
  try {
    await work();
  } catch (e) {
    showError(e);
  }
}

$("new-tenant").addEventListener("submit", (ev) => {
  ev.preventDefault();
  act(async () => {
    const name = $("new-tenant-name").value.trim();
    const made = await api("POST", "/admin/v1/tenants", { name });
    $("new-tenant-name").value = "";
    showSecret(`API key of tenant “${made.tenant.name}” — shown only this once:`, made.api_key);
    await loadTenants(false);
    await selectTenant(made.tenant);
    await loadAudit(false);
  });
});

$("more-tenants").addEventListener("click", () => act(() => loadTenants(true)));

function setDisabled(t, disabled) {
  if (disabled && !confirm(`Disable “${t.name}”? Its keys stop working and its open connections close.`)) return;
  act(async () => {
    replaceTenant(await api("POST", `/admin/v1/tenants/${enc(t.id)}/${disabled ? "disable" : "enable"}`));
    await loadAudit(false);
  });
}

function deleteTenant(t) {
  if (!confirm(`Delete “${t.name}” with all its chats, messages, keys and usage? This cannot be undone.`)) return;
  act(async () => {
    await api("DELETE", `/admin/v1/tenants/${enc(t.id)}`);
    if (state.tenant && state.tenant.id === t.id) {
      state.tenant = null;
      $("tenant").hidden = true;
    }
    await loadTenants(false);
    await Promise.all([loadUsage(), loadAudit(false)]);
  });
}

// ---------- one tenant: settings and keys ----------

async function selectTenant(t) {
  state.tenant = t;
  renderTenants();
  $("tenant").hidden = false;
  $("tenant-h").textContent = t.name;
  $("tenant-id").textContent = t.id;
  const form = $("settings");
  for (const input of form.querySelectorAll("input")) {
    const [group, field] = input.name.split(".");
    const v = t[group][field];
    input.value = v === null || v === undefined ? "" : String(v);
  }
  await act(() => Promise.all([loadKeys(), loadUsage()]));
}

$("settings").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = state.tenant;
  if (!t) return;
  const body = { limits: {}, budgets: {} };
  for (const input of $("settings").querySelectorAll("input")) {
    const [group, field] = input.name.split(".");
    const v = input.value.trim();
    body[group][field] = v === "" ? null : Number(v);
  }
  act(async () => {
    replaceTenant(await api("PATCH", `/admin/v1/tenants/${enc(t.id)}`, body));
    await loadAudit(false);
  });
});

function keyState(k) {
  return el("span", { class: `state ${k.state}` }, k.state);
}

async function loadKeys() {
  const t = state.tenant;
  const { keys } = await api("GET", `/admin/v1/tenants/${enc(t.id)}/keys`);
  const body = $("keys").tBodies[0];
  body.replaceChildren();
  for (const k of keys) {
    body.append(
      el(
        "tr",
        { "data-prefix": k.prefix },
        el("td", {}, k.name || "—"),
        el("td", {}, el("code", {}, k.prefix + "…")),
        el("td", {}, keyState(k)),
        el("td", {}, when(k.created_at)),
        el("td", {}, when(k.last_used_at)),
        el("td", {}, when(k.expires_at)),
        el(
          "td",
          { class: "tools" },
          k.state === "revoked" ? null : button("Revoke", `Revoke ${k.name || k.prefix}`, () => revokeKey(k), "revoke danger"),
        ),
      ),
    );
  }
}

$("new-key").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = state.tenant;
  if (!t) return;
  const body = {};
  const name = $("new-key-name").value.trim();
  if (name) body.name = name;
  const expires = $("new-key-expires").value;
  if (expires) body.expires_at = new Date(expires).toISOString();
  act(async () => {
    const made = await api("POST", `/admin/v1/tenants/${enc(t.id)}/keys`, body);
    $("new-key-name").value = "";
    $("new-key-expires").value = "";
    showSecret(`New key${made.key.name ? ` “${made.key.name}”` : ""} of “${t.name}” — shown only this once:`, made.api_key);
    await Promise.all([loadKeys(), loadTenants(false), loadAudit(false)]);
  });
});

function revokeKey(k) {
  if (!confirm(`Revoke ${k.name || k.prefix}? It stops working at once.`)) return;
  act(async () => {
    await api("DELETE", `/admin/v1/tenants/${enc(state.tenant.id)}/keys/${enc(k.id)}`);
    await Promise.all([loadKeys(), loadTenants(false), loadAudit(false)]);
  });
}

// ---------- usage chart ----------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  e.append(...children);
  return e;
}

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

// Stacked bars, prompt below completion, one per UTC day of the range; each bar's title says
// its numbers (hover, or a screen reader).
function drawChart(from, to, rows) {
  const days = [];
  for (let d = new Date(from + "T00:00:00Z"); isoDay(d) <= to; d.setUTCDate(d.getUTCDate() + 1)) days.push(isoDay(d));
  const byDay = new Map(days.map((d) => [d, { prompt: 0, completion: 0, replies: 0 }]));
  for (const r of rows) {
    const v = byDay.get(r.day);
    if (!v) continue;
    v.prompt += r.prompt_tokens;
    v.completion += r.completion_tokens;
    v.replies += r.replies;
  }
  const W = 720, H = 220, left = 56, bottom = 24, top = 10;
  const max = Math.max(1, ...[...byDay.values()].map((v) => v.prompt + v.completion));
  const plotH = H - bottom - top;
  const step = (W - left - 8) / days.length;
  const y = (n) => top + plotH - (n / max) * plotH;
  const chart = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": `Tokens per day from ${from} to ${to}`,
    class: "usage-chart",
  });
  chart.append(
    svg("line", { x1: left, y1: y(0), x2: W - 4, y2: y(0), class: "axis" }),
    svg("text", { x: left - 6, y: y(max) + 4, "text-anchor": "end", class: "tick" }, num(max)),
    svg("text", { x: left - 6, y: y(0) + 4, "text-anchor": "end", class: "tick" }, "0"),
  );
  days.forEach((d, i) => {
    const v = byDay.get(d);
    const x = left + i * step + 1;
    const w = Math.max(1, step - 2);
    const g = svg("g", { class: "day", "data-day": d, "data-tokens": v.prompt + v.completion });
    g.append(svg("title", {}, `${d}: ${num(v.prompt)} prompt + ${num(v.completion)} completion tokens, ${num(v.replies)} replies`));
    if (v.prompt) g.append(svg("rect", { x, y: y(v.prompt), width: w, height: y(0) - y(v.prompt), class: "prompt" }));
    if (v.completion) {
      const total = v.prompt + v.completion;
      g.append(svg("rect", { x, y: y(total), width: w, height: y(v.prompt) - y(total), class: "completion" }));
    }
    // An invisible full-height target, so an empty day has a title too.
    g.append(svg("rect", { x, y: top, width: w, height: plotH, class: "hit" }));
    chart.append(g);
    if (i % 5 === 0 || i === days.length - 1) {
      chart.append(svg("text", { x: x + w / 2, y: H - 6, "text-anchor": "middle", class: "tick" }, d.slice(5)));
    }
  });
  const legend = svg("g", { class: "legend" });
  legend.append(
    svg("rect", { x: left + 8, y: top, width: 10, height: 10, class: "prompt" }),
    svg("text", { x: left + 22, y: top + 9, class: "tick" }, "prompt"),
    svg("rect", { x: left + 78, y: top, width: 10, height: 10, class: "completion" }),
    svg("text", { x: left + 92, y: top + 9, class: "tick" }, "completion"),
  );
  chart.append(legend);
  $("chart").replaceChildren(chart);
  const sum = [...byDay.values()].reduce(
    (a, v) => ({ p: a.p + v.prompt, c: a.c + v.completion, r: a.r + v.replies }),
    { p: 0, c: 0, r: 0 },
  );
  $("usage-total").textContent = `${from} to ${to} (UTC): ${num(sum.p)} prompt + ${num(sum.c)} completion tokens in ${num(sum.r)} replies`;
}

async function loadUsage() {
  const to = isoDay(new Date());
  const start = new Date();
  start.setUTCDate(start.getUTCDate() - (DAYS - 1));
  const from = isoDay(start);
  const t = state.tenant;
  const only = t ? `&tenant=${enc(t.id)}` : "";
  $("usage-scope").textContent = t ? `tenant ${t.name}` : "all tenants";
  const report = await api("GET", `/admin/v1/usage?group_by=day&from=${from}&to=${to}${only}`);
  drawChart(report.from, report.to, report.rows);
}

// ---------- audit log ----------

function auditDetails(r) {
  const d = r.details || {};
  const parts = [];
  if (d.changes) {
    for (const [k, v] of Object.entries(d.changes)) parts.push(`${k}: ${v.from ?? "—"} → ${v.to ?? "—"}`);
  } else if (d.count !== undefined) {
    parts.push(`×${num(d.count)}`);
    if (d.reason) parts.push(d.reason);
    if (d.via) parts.push(`via ${d.via.join(", ")}`);
    if (d.user_id) parts.push(`user ${d.user_id}, ${d.scope} ${d.period} budget ${num(d.limit)}`);
  } else {
    if (d.prefix) parts.push(`key ${d.prefix}…${d.name ? ` “${d.name}”` : ""}`);
    if (d.expires_at) parts.push(`expires ${when(d.expires_at)}`);
    if (d.first_key) parts.push(`first key ${d.first_key.prefix}…`);
    if (d.bootstrap) parts.push("on first start");
  }
  return parts.join("; ");
}

async function loadAudit(more) {
  const offset = more ? state.auditOffset : 0;
  const action = $("audit-action").value;
  const filter = action ? `&action=${enc(action)}` : "";
  const page = await api("GET", `/admin/v1/audit?offset=${offset}&limit=${PAGE}${filter}`);
  const body = $("audit").tBodies[0];
  if (!more) body.replaceChildren();
  for (const r of page.records) {
    const by = r.actor.id ? `${r.actor.kind} ${r.actor.id}` : r.actor.kind;
    body.append(
      el(
        "tr",
        { "data-action": r.action },
        el("td", {}, when(r.at)),
        el("td", {}, r.action),
        el("td", { class: "muted" }, by),
        el("td", {}, r.tenant_name || "—"),
        el("td", {}, auditDetails(r)),
      ),
    );
  }
  state.auditOffset = offset + page.records.length;
  $("more-audit").hidden = !page.has_more;
}

$("audit-action").addEventListener("change", () => act(() => loadAudit(false)));
$("more-audit").addEventListener("click", () => act(() => loadAudit(true)));

// ---------- sign in ----------

async function signIn() {
  clearError();
  $("conn").textContent = "signing in…";
  try {
    await loadTenants(false);
    await Promise.all([loadUsage(), loadAudit(false)]);
  } catch (e) {
    $("conn").textContent = "signed out";
    $("conn").className = "conn down";
    $("console").hidden = true;
    $("signed-out").hidden = false;
    showError(e);
    return;
  }
  sessionStorage.setItem("confab.admin.key", state.key);
  $("conn").textContent = "signed in";
  $("conn").className = "conn ok";
  $("console").hidden = false;
  $("signed-out").hidden = true;
  $("logout").hidden = false;
  for (const e of $("login").querySelectorAll("label, button[type=submit]")) e.hidden = true;
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  signIn();
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("confab.admin.key");
  location.reload();
});

$("banner-close").addEventListener("click", clearError);

if (state.key) {
  $("key").value = state.key;
  signIn();
}
