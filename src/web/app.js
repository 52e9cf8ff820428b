// confab's browser chat page: the REST API for chats and history, /ws/chat for live
// replies. Plain JS, no build step, no third-party code (it is served by the binary and
// works air-gapped).
"use strict";

const PAGE = 50;

// A user token (`cfu_…`, minted by the tenant's backend with POST /api/v1/tokens) may come
// in the URL fragment, `/#token=cfu_…&user=alice`: it is taken from there (and the fragment
// cleared, so it is not left in the address bar or history) and kept for this tab only. A
// tenant key typed into the form is kept in local storage as before.
const fromLink = (() => {
  const p = new URLSearchParams(location.hash.slice(1));
  const token = p.get("token");
  const user = p.get("user");
  if (!token || !user) return null;
  history.replaceState(null, "", location.pathname + location.search);
  sessionStorage.setItem("confab.key", token);
  sessionStorage.setItem("confab.user", user);
  return { key: token, user };
})();

const isToken = (key) => key.startsWith("cfu_");

const state = {
  key: (fromLink && fromLink.key) || sessionStorage.getItem("confab.key") || localStorage.getItem("confab.key") || "",
  user: (fromLink && fromLink.user) || sessionStorage.getItem("confab.user") || localStorage.getItem("confab.user") || "",
  chats: [],
  chatsOffset: 0,
  chat: null, // the open chat
  oldestOffset: 0, // how many messages (newest first) are shown
  ws: null,
  wsWanted: false, // reconnect when it drops
  retry: 0,
  retryTimer: null,
  streaming: null, // id of the assistant message streaming in the open chat
  lastIndex: new Map(), // message id -> index of the last delta shown
  branchChange: false, // a regenerate or edit was sent: reload the branch when it starts
  search: "", // the chat list's search words ("" lists all chats)
};

// ---------- errors ----------

const FRIENDLY = {
  missing_api_key: "Paste the tenant API key (or a user token) first.",
  invalid_api_key: "The API key was not accepted (wrong or revoked).",
  api_key_expired: "The key or token has expired; get a new one and sign in again.",
  forbidden: "This key or token may not do that (a user token acts for its own user only).",
  tenant_disabled: "This tenant is disabled; ask the operator.",
  quota_exceeded: "The token budget is used up for now; it resets later (see the details).",
  rate_limited: "Too many requests — slow down a little.",
  queue_full: "Too many replies are waiting for your tenant; try again in a moment.",
  server_busy: "The server is busy with other replies; try again in a moment.",
  generation_in_progress: "A reply is still being written; wait for it or press Stop.",
  model_not_ready: "The model is still loading; try again shortly.",
  database_unavailable: "The database is unavailable; try again shortly.",
  chat_not_found: "This chat no longer exists.",
  too_many_connections: "Too many open connections for your tenant; close another tab.",
  content_too_long: "The message is too long.",
  slow_consumer: "The connection fell behind; reconnecting.",
  context_length_exceeded: "The message is too long for the model; send a shorter one.",
  reply_not_saved: "The reply was shown but could not be saved (the database kept failing).",
  request_timeout: "The request was sent too slowly; try again.",
  shutting_down: "The server is restarting.",
};

function describe(err) {
  const code = err && err.code;
  let text = FRIENDLY[code] || (err && err.message) || "Something went wrong.";
  const d = (err && err.details) || {};
  const ms = d.retry_after_ms || (d.retry_after_seconds && d.retry_after_seconds * 1000);
  if (ms) text += ` (retry in ${Math.ceil(ms / 1000)} s)`;
  return code ? `${text} [${code}]` : text;
}

function showError(err) {
  bannerError(err, describe);
}

// ---------- REST ----------

const api = (method, path, body) => request(state.key, method, path, body);


// ---------- chats ----------

function chatLabel(c) {
  return c.title || "Untitled chat";
}

function renderChats() {
  const list = $("chats");
  list.replaceChildren();
  for (const c of state.chats) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (state.chat && state.chat.id === c.id) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = chatLabel(c);
    const when = document.createElement("small");
    if (c.match) {
      // A search result: the passage that matched, its words marked.
      when.className = "snippet";
      when.append(...highlighted(c.match.snippet, c.match.highlights));
    } else {
      when.textContent = `${c.message_count} messages · ${new Date(c.last_activity_at).toLocaleString()}`;
    }
    open.append(when);
    open.addEventListener("click", () => openChat(c));
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "tool rename";
    rename.title = rename.ariaLabel = `Rename ${chatLabel(c)}`;
    rename.textContent = "✎";
    rename.addEventListener("click", () => startRename(li, c));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "tool delete";
    del.title = del.ariaLabel = `Delete ${chatLabel(c)}`;
    del.textContent = "✕";
    del.addEventListener("click", () => deleteChat(c));
    li.append(open, rename, del);
    list.append(li);
  }
}

// The last page of the branch, for the ids of a reply's alternatives and its user message's.
async function refreshSiblings() {
  if (!state.chat) return;
  const page = await api("GET", `/api/v1/chats/${state.chat.id}/messages?order=desc&limit=2`);
  for (const m of page.messages) {
    const li = document.querySelector(`li.msg[data-id="${m.id}"]`);
    if (li && m.siblings) {
      li.dataset.siblings = JSON.stringify(m.siblings);
      showTools(li, m);
    }
  }
}

async function loadChats(more) {
  const offset = more ? state.chatsOffset : 0;
  const q = state.search ? `&q=${enc(state.search)}` : "";
  const page = await api("GET", `/api/v1/chats/user/${enc(state.user)}?offset=${offset}&limit=${PAGE}${q}`);
  state.chats = more ? state.chats.concat(page.chats) : page.chats;
  state.chatsOffset = offset + page.chats.length;
  $("more-chats").hidden = !page.has_more;
  renderChats();
}

// Text with <mark> around the given [start, end) character ranges (as text nodes: a
// snippet is message text, never markup).
function highlighted(text, ranges) {
  const chars = Array.from(text);
  const out = [];
  let at = 0;
  for (const [a, b] of ranges) {
    if (a > at) out.push(document.createTextNode(chars.slice(at, a).join("")));
    const m = document.createElement("mark");
    m.textContent = chars.slice(a, b).join("");
    out.push(m);
    at = b;
  }
  if (at < chars.length) out.push(document.createTextNode(chars.slice(at).join("")));
  return out;
}

let searchTimer = null;
function onSearch() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    const words = $("search").value.trim();
    if (words === state.search) return;
    state.search = words;
    loadChats(false).catch(showError);
  }, 250);
}

// Downloads the open chat as JSON (its whole tree) or Markdown (the branch shown).
async function exportChat(format) {
  if (!state.chat) return;
  try {
    const r = await fetch(`/api/v1/chats/${state.chat.id}/export?format=${format}`, { headers: { "X-API-Key": state.key } });
    if (!r.ok) {
      const data = await r.json().catch(() => null);
      throw (data && data.error) || { code: "http_" + r.status, message: r.statusText };
    }
    const name = /filename="([^"]+)"/.exec(r.headers.get("content-disposition") || "");
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = name ? name[1] : `chat.${format === "markdown" ? "md" : "json"}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  } catch (e) {
    showError(e);
  }
}

// Brings in a chat from a JSON file: an export of this server (every branch) or an
// OpenAI-style `messages` list (or a bare list of messages); the signed-in user owns it.
async function importChat(file) {
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch {
    showError(`${file.name} is not JSON; choose a chat exported as JSON.`);
    return;
  }
  const body = Array.isArray(data) ? { messages: data } : { ...data };
  body.user_id = state.user;
  try {
    const c = await api("POST", "/api/v1/chats/import", body);
    await loadChats(false);
    await openChat(c);
  } catch (e) {
    showError(e);
  }
}

function startRename(li, c) {
  const input = document.createElement("input");
  input.value = c.title || "";
  input.ariaLabel = "New title";
  input.maxLength = 256;
  li.replaceChildren(input);
  input.focus();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    if (save) {
      try {
        const title = input.value.trim();
        const updated = await api("PATCH", `/api/v1/chats/${c.id}`, { title: title || null });
        Object.assign(c, updated);
        if (state.chat && state.chat.id === c.id) {
          state.chat = c;
          $("chat-title").textContent = chatLabel(c);
        }
      } catch (e) {
        showError(e);
      }
    }
    renderChats();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteChat(c) {
  if (!confirm(`Delete “${chatLabel(c)}” and all its messages?`)) return;
  try {
    await api("DELETE", `/api/v1/chats/${c.id}`);
    if (state.chat && state.chat.id === c.id) closeChat();
    await loadChats(false);
  } catch (e) {
    showError(e);
  }
}

async function newChat() {
  try {
    const c = await api("POST", "/api/v1/chats/", { user_id: state.user, title: null });
    await loadChats(false);
    await openChat(c);
    $("input").focus();
  } catch (e) {
    showError(e);
  }
}

// ---------- messages ----------

function messageNode(m) {
  let li = document.querySelector(`li.msg[data-id="${m.id}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.id = m.id;
    const who = document.createElement("span");
    who.className = "who";
    const text = document.createElement("span");
    text.className = "text";
    const meta = document.createElement("span");
    meta.className = "meta";
    li.append(who, text, meta);
  }
  li.className = `msg ${m.role} ${m.status || "complete"}`;
  li.querySelector(".who").textContent = m.role === "user" ? "You" : "Assistant";
  // A reply streaming over the socket knows more than a page of history fetched meanwhile.
  if (!(m.status === "streaming" && state.lastIndex.has(m.id))) showText(li, m.role, m.content);
  // History fetched over REST has no timings: keep those a live reply showed.
  if (m.timings || !li.dataset.timed) li.querySelector(".meta").textContent = metaLine(m);
  if (m.timings) li.dataset.timed = "1";
  if (m.siblings) li.dataset.siblings = JSON.stringify(m.siblings);
  showTools(li, m);
  return li;
}

function button(text, title, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.title = b.ariaLabel = title;
  b.addEventListener("click", onClick);
  return b;
}

// "‹ 2/3 ›" between a message and its alternatives (regenerated replies, edited messages),
// and the Regenerate / Edit actions.
function showTools(li, m) {
  let tools = li.querySelector(".tools");
  if (!tools) {
    tools = document.createElement("span");
    tools.className = "tools";
    li.append(tools);
  }
  tools.replaceChildren();
  const id = li.dataset.id;
  const siblings = JSON.parse(li.dataset.siblings || "[]");
  const at = siblings.indexOf(id);
  if (siblings.length > 1 && at >= 0) {
    const prev = button("‹", "Previous version", "prev", () => switchTo(siblings[at - 1]));
    prev.disabled = at === 0;
    const pos = document.createElement("span");
    pos.className = "pos";
    pos.textContent = `${at + 1}/${siblings.length}`;
    const next = button("›", "Next version", "next", () => switchTo(siblings[at + 1]));
    next.disabled = at === siblings.length - 1;
    const nav = document.createElement("span");
    nav.className = "switch";
    nav.append(prev, pos, next);
    tools.append(nav);
  }
  if (id.startsWith("pending-") || (m.status || "complete") === "streaming") return;
  if (m.role === "assistant") {
    tools.append(button("↻ Regenerate", "Write this reply again (the old one is kept)", "regenerate", () => turn({ type: "regenerate", message_id: id })));
  } else if (m.role === "user") {
    tools.append(button("✎ Edit", "Edit this message and answer it again (the old one is kept)", "edit", () => startEdit(li)));
  }
}

// Sends a regenerate or edit; the branch it starts is loaded when its reply starts.
function turn(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    showError("Not connected to the chat yet; wait a moment and try again.");
    return false;
  }
  state.branchChange = true;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function startEdit(li) {
  const text = li.querySelector(".text");
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = li.dataset.raw || "";
  box.rows = Math.min(10, box.value.split("\n").length + 1);
  box.ariaLabel = "Edited message";
  const cancel = () => showText(li, "user", li.dataset.raw || "");
  const save = button("Save and send", "Send the edited message", "save", () => {
    const content = box.value.trim();
    if (content && turn({ type: "edit", message_id: li.dataset.id, content })) cancel();
  });
  const keep = button("Cancel", "Keep the message as it is", "cancel", cancel);
  const bar = document.createElement("span");
  bar.className = "edit-actions";
  bar.append(save, keep);
  text.replaceChildren(box, bar);
  box.focus();
}

async function switchTo(messageId) {
  if (!state.chat || !messageId) return;
  try {
    await api("PUT", `/api/v1/chats/${state.chat.id}/active`, { message_id: messageId });
    await loadLatest();
    loadChats(false).catch(() => {});
  } catch (e) {
    showError(e);
  }
}

// What people type is shown as typed; replies are Markdown (rendered to DOM nodes by
// markdown.js, never as HTML). The source stays on the item (`data-raw`) for streaming.
function showText(li, role, content) {
  const text = li.querySelector(".text");
  li.dataset.raw = content;
  if (role === "assistant") {
    text.classList.add("md");
    text.replaceChildren(Markdown.render(content));
  } else {
    text.textContent = content;
  }
}

// Streaming re-renders a reply at most once a frame, however fast tokens come.
const pendingRender = new Set();
function renderSoon(li) {
  if (pendingRender.has(li)) return;
  pendingRender.add(li);
  requestAnimationFrame(() => {
    pendingRender.delete(li);
    const follow = atBottom();
    showText(li, "assistant", li.dataset.raw || "");
    if (follow) scrollDown(true);
  });
}

function metaLine(m) {
  if (m.role !== "assistant") return "";
  const parts = [];
  if (m.status && !["complete", "streaming"].includes(m.status)) parts.push(m.status);
  const t = m.timings;
  if (t) {
    if (t.time_to_first_token_ms != null) parts.push(`first token ${t.time_to_first_token_ms} ms`);
    if (t.tokens_per_second) parts.push(`${t.tokens_per_second} tokens/s`);
    if (t.queue_ms) parts.push(`queued ${t.queue_ms} ms`);
  }
  if (m.usage) parts.push(`${m.usage.completion_tokens} tokens`);
  return parts.join(" · ");
}

function atBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

function scrollDown(force) {
  const log = $("log");
  if (force || atBottom()) log.scrollTop = log.scrollHeight;
}

async function loadLatest() {
  const page = await api("GET", `/api/v1/chats/${state.chat.id}/messages?order=desc&limit=${PAGE}&offset=0`);
  const list = $("messages");
  list.replaceChildren(...page.messages.reverse().map(messageNode));
  state.oldestOffset = page.messages.length;
  $("older").hidden = !page.has_more;
  scrollDown(true);
}

async function loadOlder() {
  const page = await api(
    "GET",
    `/api/v1/chats/${state.chat.id}/messages?order=desc&limit=${PAGE}&offset=${state.oldestOffset}`,
  );
  const log = $("log");
  const before = log.scrollHeight;
  $("messages").prepend(...page.messages.reverse().map(messageNode));
  state.oldestOffset += page.messages.length;
  $("older").hidden = !page.has_more;
  log.scrollTop += log.scrollHeight - before; // keep the view where it was
}

function closeChat() {
  state.wsWanted = false;
  if (state.ws) state.ws.close(1000, "closed");
  state.ws = null;
  state.chat = null;
  setStreaming(null);
  $("chat").hidden = true;
  $("empty").hidden = false;
}

async function openChat(c) {
  closeChat();
  state.chat = c;
  $("chat-title").textContent = chatLabel(c);
  $("queue").textContent = "";
  $("chat").hidden = false;
  $("empty").hidden = true;
  renderChats();
  try {
    await loadLatest();
  } catch (e) {
    showError(e);
  }
  state.wsWanted = true;
  state.retry = 0;
  connect();
}

// ---------- live chat ----------

function setConn(text, ok) {
  const el = $("conn");
  el.textContent = text;
  el.className = "conn " + (ok ? "ok" : "down");
}

function setStreaming(id) {
  state.streaming = id;
  $("stop").hidden = !id;
  if (!id) $("queue").textContent = "";
}

function connect() {
  clearTimeout(state.retryTimer);
  if (!state.wsWanted || !state.chat) return;
  const chat = state.chat;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const url = `${proto}://${location.host}/ws/chat?api_key=${enc(state.key)}&user_id=${enc(state.user)}&chat_id=${chat.id}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  setConn("connecting…", false);
  let refused = null;
  ws.onmessage = (m) => {
    if (state.ws !== ws) return;
    let ev;
    try {
      ev = JSON.parse(m.data);
    } catch {
      return;
    }
    if (ev.event_type === "error") refused = ev;
    onEvent(ev);
  };
  ws.onopen = () => {
    if (state.ws !== ws) return;
    if (state.retry > 0) {
      // Back after a drop: what finished meanwhile is in the history.
      loadLatest().catch(showError);
      loadChats(false).catch(() => {});
    }
    state.retry = 0;
  };
  ws.onclose = (e) => {
    if (state.ws !== ws) return;
    state.ws = null;
    setStreaming(null);
    // 44xx: the server refused (bad key, chat gone, too many connections): do not retry
    // blindly, except for the connection limit, which frees up by itself.
    if (e.code >= 4400 && e.code < 4500 && e.code !== 4429) {
      setConn("disconnected", false);
      if (!refused) showError({ code: e.reason, message: `Connection refused (${e.reason || e.code}).` });
      state.wsWanted = false;
      return;
    }
    if (!state.wsWanted || !state.chat || state.chat.id !== chat.id) {
      setConn("disconnected", false);
      return;
    }
    const delay = Math.min(10000, 500 * 2 ** state.retry);
    state.retry += 1;
    setConn(`connection lost — reconnecting in ${Math.round(delay / 1000)} s`, false);
    state.retryTimer = setTimeout(connect, delay);
  };
}

function onEvent(ev) {
  const log = (m) => messageNode(m);
  switch (ev.event_type) {
    case "connection_established":
      setConn("connected", true);
      clearError();
      break;
    case "message_received": {
      // The optimistic copy of the user's message gets its real id.
      const pending = document.querySelector("li.msg.user.pending");
      if (pending) {
        pending.dataset.id = ev.message_id;
        pending.classList.remove("pending");
      }
      break;
    }
    case "chat_updated":
      // The model wrote the chat's title (after its first reply).
      if (state.chat && ev.chat_id === state.chat.id) {
        state.chat.title = ev.title;
        $("chat-title").textContent = chatLabel(state.chat);
      }
      loadChats(false).catch(() => {});
      break;
    case "message_queued":
      $("queue").textContent = `waiting for the model — position ${ev.position}`;
      break;
    case "message_stream_started": {
      $("queue").textContent = "";
      state.lastIndex.set(ev.message_id, -1);
      const node = log({ id: ev.message_id, role: "assistant", content: "", status: "streaming" });
      if (!node.isConnected) $("messages").append(node);
      setStreaming(ev.message_id);
      scrollDown(true);
      // A regenerated reply or an edit starts a branch: show that branch.
      if (state.branchChange) {
        state.branchChange = false;
        loadLatest().catch(showError);
      }
      break;
    }
    case "message_stream_token": {
      const last = state.lastIndex.get(ev.message_id) ?? -1;
      if (ev.index <= last) break;
      state.lastIndex.set(ev.message_id, ev.index);
      const li = document.querySelector(`li.msg[data-id="${ev.message_id}"]`);
      if (li) {
        li.dataset.raw = (li.dataset.raw || "") + ev.token;
        renderSoon(li);
      }
      break;
    }
    case "message_stream_ended": {
      const status = { stop: "complete", length: "complete", cancelled: "cancelled", error: "failed" }[ev.finish_reason] || "complete";
      const node = log({
        id: ev.message_id,
        role: "assistant",
        content: ev.content,
        status,
        usage: ev.usage,
        timings: ev.timings,
      });
      if (!node.isConnected) $("messages").append(node);
      state.lastIndex.delete(ev.message_id);
      if (state.streaming === ev.message_id) setStreaming(null);
      scrollDown(false);
      loadChats(false).catch(() => {});
      // The reply's alternatives (if it was regenerated) come with the branch.
      if (JSON.parse(node.dataset.siblings || "[]").length === 0) refreshSiblings().catch(() => {});
      break;
    }
    case "error":
      state.branchChange = false;
      if (ev.code === "generation_in_progress" || ev.code === "queue_full" || ev.code === "server_busy" || ev.code === "rate_limited") {
        // The message was not saved: put it back in the box.
        const pending = document.querySelector("li.msg.user.pending");
        if (pending) {
          $("input").value = pending.querySelector(".text").textContent;
          pending.remove();
        }
      }
      if (ev.code !== "nothing_to_cancel") showError(ev);
      break;
  }
}

function send(text) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    showError("Not connected to the chat yet; wait a moment and send again.");
    return false;
  }
  const node = messageNode({ id: "pending-" + Date.now(), role: "user", content: text, status: "complete" });
  node.classList.add("pending");
  $("messages").append(node);
  scrollDown(true);
  state.ws.send(JSON.stringify({ content: text, metadata: { source: "web" } }));
  return true;
}

// ---------- wiring ----------

async function login(e) {
  e.preventDefault();
  state.key = $("key").value.trim();
  state.user = $("user").value.trim();
  // A short-lived user token belongs to this tab; a tenant key to this browser.
  const keep = isToken(state.key) ? sessionStorage : localStorage;
  (isToken(state.key) ? localStorage : sessionStorage).removeItem("confab.key");
  keep.setItem("confab.key", state.key);
  keep.setItem("confab.user", state.user);
  closeChat();
  clearError();
  try {
    await loadChats(false);
    $("new-chat").disabled = false;
    $("import").disabled = false;
    setConn("signed in", true);
  } catch (err) {
    $("new-chat").disabled = true;
    $("import").disabled = true;
    state.chats = [];
    renderChats();
    setConn("not connected", false);
    showError(err);
  }
}

function init() {
  $("key").value = state.key;
  $("user").value = state.user;
  $("login").addEventListener("submit", login);
  $("new-chat").addEventListener("click", newChat);
  $("more-chats").addEventListener("click", () => loadChats(true).catch(showError));
  $("search").addEventListener("input", onSearch);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) importChat(file);
  });
  $("export-json").addEventListener("click", () => exportChat("json"));
  $("export-md").addEventListener("click", () => exportChat("markdown"));
  $("older").addEventListener("click", () => loadOlder().catch(showError));
  $("banner-close").addEventListener("click", clearError);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (text && send(text)) $("input").value = "";
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "cancel" }));
  });
  if (state.key && state.user) $("login").requestSubmit();
}

init();
