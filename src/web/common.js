// What the two browser pages (chat and admin) share: element lookup, the error banner and
// REST calls with a key. Loaded before each page's own script.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

// Shows `err` in the page's banner: a string as it is, an API error as `describe` words it.
function bannerError(err, describe) {
  $("banner-text").textContent = typeof err === "string" ? err : describe(err);
  $("banner").hidden = false;
}

function clearError() {
  $("banner").hidden = true;
}

// Calls the API with `key`: the JSON answer (null for 204), or a rejection with the server's
// `error` object ({code, message, details}) or one saying the server cannot be reached.
async function request(key, method, path, body) {
  const init = { method, headers: { "X-API-Key": key } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw { code: "network", message: "The server cannot be reached." };
  }
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    throw (data && data.error) || { code: "http_" + resp.status, message: resp.statusText };
  }
  return data;
}
