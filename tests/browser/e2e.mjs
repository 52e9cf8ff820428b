// End-to-end test of the chat page at `/` in headless Chromium: sign in, create a chat, send
// a message and watch the reply stream, check it was saved, rename the chat, stop a long
// reply, survive a server restart (the page reconnects by itself and shows the reply that
// finished meanwhile), page through history, and see a readable error for a bad key; then
// the admin page: the usage chart of those replies, a tenant and a key created on the page
// (their secrets work), budgets set there, and the audit log showing it all; then a reply
// with Markdown and script payloads rendered safely.
// Screenshots go to --out. Every wait is bounded; any failure exits non-zero.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    bin: { type: "string" },
    model: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    out: { type: "string", default: "/var/tmp/confab-e2e" },
  },
});

const KEY = "e2e-key-" + Math.random().toString(36).slice(2).padEnd(16, "x");
const ADMIN = "cfa_e2e-admin-" + Math.random().toString(36).slice(2).padEnd(16, "x");
const USER = "e2e-user";
const data = mkdtempSync(path.join(tmpdir(), "confab-e2e-"));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const port = await freePort();
const base = `http://127.0.0.1:${port}`;
let server = null;
let serverLog = "";

async function startServer() {
  server = spawn(args.bin, ["serve"], {
    env: {
      ...process.env,
      CONFAB_DATA_DIR: data,
      CONFAB_BIND: `127.0.0.1:${port}`,
      CONFAB_BOOTSTRAP_API_KEY: KEY,
      CONFAB_BOOTSTRAP_ADMIN_KEY: ADMIN,
      CONFAB_MODEL: args.model,
      CONFAB_LOG: "warn",
      // Paced so a long reply lasts long enough to be stopped and to outlive a restart.
      CONFAB_DEBUG_TOKEN_INTERVAL_MS: "15",
      CONFAB_SHUTDOWN_GRACE_SECS: "20",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  server.stdout.on("data", (d) => (serverLog += d));
  server.stderr.on("data", (d) => (serverLog += d));
  for (let i = 0; i < 150; i++) {
    try {
      const r = await fetch(`${base}/readyz`);
      if (r.ok) return;
    } catch {}
    if (server.exitCode !== null) throw new Error("confab serve exited:\n" + serverLog);
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error("confab serve not ready:\n" + serverLog);
}

async function stopServer() {
  if (!server || server.exitCode !== null) return;
  const exited = new Promise((r) => server.once("exit", r));
  server.kill("SIGTERM");
  await Promise.race([exited, new Promise((r) => setTimeout(r, 30000))]);
  if (server.exitCode === null) server.kill("SIGKILL");
}

async function rest(pathname, key = KEY) {
  const r = await fetch(base + pathname, { headers: { "X-API-Key": key } });
  if (!r.ok) throw new Error(`${pathname}: ${r.status} ${await r.text()}`);
  return r.json();
}

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  console.log("ok -", what);
}

let browser;
let failed = false;
try {
  await startServer();
  browser = await chromium.launch({
    executablePath: args.chromium,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const consoleErrors = [];
  // Chromium logs refused connections and 4xx answers as console errors; those are
  // expected here (the server restarts, a wrong key is tried). Anything else is a bug.
  const expected = /WebSocket connection to|Failed to load resource/;
  page.on("console", (m) => m.type() === "error" && !expected.test(m.text()) && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("dialog", (d) => d.accept());
  page.on("response", (r) => r.status() >= 400 && console.log("http", r.status(), r.url()));
  page.setDefaultTimeout(20000);

  // A bad key: a readable error, no chats.
  await page.goto(base + "/");
  await page.fill("#key", "cfk_not_a_real_key_at_all");
  await page.fill("#user", USER);
  await page.click("#login button[type=submit]");
  await page.waitForSelector("#banner:not([hidden])");
  check(
    (await page.textContent("#banner-text")).includes("not accepted"),
    "a wrong key shows a readable error",
  );

  // Sign in and start a chat.
  await page.fill("#key", KEY);
  await page.click("#login button[type=submit]");
  await page.waitForSelector("#new-chat:not([disabled])");
  await page.click("#new-chat");
  await page.waitForSelector("#conn.ok >> text=connected");
  // Greedy and bounded, so the run does not depend on how long a sampled reply happens to be.
  {
    const { chats: [made] } = await rest(`/api/v1/chats/user/${USER}`);
    const r = await fetch(`${base}/api/v1/chats/${made.id}`, {
      method: "PATCH",
      headers: { "X-API-Key": KEY, "Content-Type": "application/json" },
      body: JSON.stringify({ config: { temperature: 0, max_tokens: 96 } }),
    });
    check(r.ok, "the chat is set to greedy decoding");
  }
  check(await page.isHidden("#banner"), "the error is gone once signed in");

  // Send a message; watch the reply stream in, token by token.
  await page.fill("#input", "What is the capital of France?");
  await page.press("#input", "Enter");
  await page.waitForSelector("li.msg.assistant.streaming");
  const lengths = new Set();
  for (let i = 0; i < 200; i++) {
    const s = await page.$("li.msg.assistant.streaming .text");
    if (!s) break;
    lengths.add((await s.textContent()).length);
    await page.waitForTimeout(10);
  }
  await page.waitForSelector("li.msg.assistant.complete .meta >> text=first token", { timeout: 60000 });
  check(lengths.size >= 2, `the reply grew while streaming (${[...lengths].length} lengths seen)`);
  // Replies are rendered Markdown; the item keeps its source text in data-raw.
  const shown = (await page.getAttribute("li.msg.assistant.complete", "data-raw")).trim();
  check(shown.length > 0, `the reply is shown: ${JSON.stringify(shown)}`);
  const meta = await page.textContent("li.msg.assistant.complete .meta");
  check(/first token \d+ ms/.test(meta), `timings are shown: ${meta}`);
  await page.screenshot({ path: path.join(args.out, "chat.png") });

  const chats = await rest(`/api/v1/chats/user/${USER}`);
  check(chats.chats.length === 1, "the chat exists once");
  const chatId = chats.chats[0].id;
  let msgs = await rest(`/api/v1/chats/${chatId}/messages?order=asc`);
  const saved = msgs.messages.find((m) => m.role === "assistant");
  check(saved && saved.status === "complete", "the reply is saved as complete");
  check(saved.content.trim() === shown, "the saved reply is what was shown");

  // Rename the chat.
  await page.click("li.current button.rename");
  await page.fill("li.current input", "Geography");
  await page.press("li.current input", "Enter");
  await page.waitForSelector("#chat-title >> text=Geography");
  check((await rest(`/api/v1/chats/${chatId}`)).title === "Geography", "the chat is renamed");

  // Stop a long reply mid-stream.
  await page.fill("#input", "Write a very long story about a dragon who learns to bake bread.");
  await page.press("#input", "Enter");
  await page.waitForFunction(() => {
    const s = document.querySelector("li.msg.assistant.streaming .text");
    return s && s.textContent.length > 10;
  });
  await page.click("#stop");
  await page.waitForSelector("li.msg.assistant.cancelled", { timeout: 60000 });
  check(await page.isHidden("#stop"), "Stop is hidden once the reply ended");
  msgs = await rest(`/api/v1/chats/${chatId}/messages?order=desc&limit=1`);
  check(msgs.messages[0].status === "cancelled", "the stopped reply is saved as cancelled");
  check(msgs.messages[0].content.length > 10, "the stopped reply keeps its text");

  // The connection drops (the server restarts) while a reply streams: the reply finishes
  // within the shutdown grace period, and the page reconnects by itself and shows it.
  await page.fill("#input", "Name three colours.");
  await page.press("#input", "Enter");
  await page.waitForSelector("li.msg.assistant.streaming");
  await stopServer();
  await page.waitForSelector("#conn.down");
  check((await page.textContent("#conn")).includes("reconnecting"), "the page says it is reconnecting");
  await startServer();
  await page.waitForSelector("#conn.ok >> text=connected", { timeout: 30000 });
  msgs = await rest(`/api/v1/chats/${chatId}/messages?order=desc&limit=1`);
  const finished = msgs.messages[0];
  check(finished.role === "assistant" && finished.status === "complete", "the reply finished during the restart");
  await page.waitForFunction(
    (id) => document.querySelector(`li.msg[data-id="${id}"].complete`),
    finished.id,
  );
  check(
    (await page.getAttribute(`li.msg[data-id="${finished.id}"]`, "data-raw")).trim() === finished.content.trim(),
    "after reconnecting, the page shows the finished reply",
  );

  const db = await rest(`/api/v1/chats/${chatId}`);
  check(db.message_count === 6, `six messages stored (${db.message_count})`);
  await page.screenshot({ path: path.join(args.out, "after-restart.png") });

  // Signed in by a link with a user token (what an app's backend hands a browser): the same
  // chats, no tenant key in the page, and the token gone from the address bar.
  {
    const r = await fetch(`${base}/api/v1/tokens`, {
      method: "POST",
      headers: { "X-API-Key": KEY, "Content-Type": "application/json" },
      body: JSON.stringify({ user_id: USER, ttl_seconds: 600 }),
    });
    check(r.status === 201, "a user token is minted");
    const { token } = await r.json();
    const tab = await browser.newPage();
    tab.on("console", (m) => m.type() === "error" && !expected.test(m.text()) && consoleErrors.push(m.text()));
    await tab.goto(`${base}/#token=${encodeURIComponent(token)}&user=${encodeURIComponent(USER)}`);
    await tab.waitForSelector("#chats li");
    check(new URL(tab.url()).hash === "", "the token is taken out of the address bar");
    check((await tab.textContent("#chats")).includes("Geography"), "the token signs in to the user's chats");
    const kept = await tab.evaluate(() => [sessionStorage.getItem("confab.key"), localStorage.getItem("confab.key")]);
    check(kept[0] === token && kept[1] !== token, "the token is kept for the tab, not in local storage");
    await tab.close();
  }

  // The admin page: the usage chart holds today's replies; a tenant, a key and a budget made
  // on the page work; the audit log shows them.
  {
    const admin = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    admin.on("console", (m) => m.type() === "error" && !expected.test(m.text()) && consoleErrors.push(m.text()));
    admin.on("pageerror", (e) => consoleErrors.push(String(e)));
    admin.on("dialog", (d) => d.accept());
    admin.setDefaultTimeout(20000);
    await admin.goto(base + "/admin");
    await admin.fill("#key", ADMIN);
    await admin.click("#login button[type=submit]");
    await admin.waitForSelector("#conn.ok");
    check(await admin.isVisible('#tenants tr[data-name="default"]'), "the admin page lists the tenants");
    const today = new Date().toISOString().slice(0, 10);
    const report = await rest(`/admin/v1/usage?group_by=day&from=${today}&to=${today}`, ADMIN);
    const want = report.rows.reduce((n, r) => n + r.prompt_tokens + r.completion_tokens, 0);
    const bar = await admin.waitForSelector(`#chart svg g.day[data-day="${today}"]`);
    const drawn = Number(await bar.getAttribute("data-tokens"));
    check(want > 0 && drawn === want, `today's bar holds today's tokens (${drawn} of ${want})`);
    const rects = await admin.$$eval(`#chart g.day[data-day="${today}"] rect`, (r) => r.map((x) => x.getAttribute("class")));
    check(rects.includes("prompt") && rects.includes("completion"), "the bar is drawn, prompt and completion stacked");
    check((await admin.$$("#chart g.day")).length === 30, "the chart has 30 days");
    await admin.screenshot({ path: path.join(args.out, "admin.png"), fullPage: true });

    await admin.fill("#new-tenant-name", "e2e-made");
    await admin.click("#new-tenant button[type=submit]");
    await admin.waitForSelector("#secret:not([hidden])");
    const first = (await admin.textContent("#secret-value")).trim();
    check(first.startsWith("cfk_"), "a tenant made on the page shows its key once");
    check((await rest("/api/v1/chats/user/someone", first)).chats.length === 0, "that key works");
    await admin.click("#secret-close");
    await admin.waitForSelector("#tenant-h >> text=e2e-made");
    await admin.fill("#new-key-name", "from the page");
    await admin.click("#new-key button[type=submit]");
    await admin.waitForSelector("#secret:not([hidden])");
    const second = (await admin.textContent("#secret-value")).trim();
    check(second.startsWith("cfk_") && second !== first, "a key made on the page shows its secret once");
    check((await rest("/api/v1/chats/user/someone", second)).chats.length === 0, "that key works too");
    await admin.waitForFunction(() => document.querySelectorAll("#keys tbody tr").length === 2);
    await admin.click("#secret-close");
    await admin.fill('#settings input[name="budgets.tokens_per_day"]', "5000");
    await admin.click("#settings button[type=submit]");
    await admin.waitForSelector('#audit tr[data-action="tenant.update"]');
    const made = await rest("/admin/v1/tenants/e2e-made", ADMIN);
    check(made.budgets.tokens_per_day === 5000 && made.limits.requests_per_minute === null, "the budget set on the page is saved");
    const log = await admin.$$eval("#audit tbody tr", (rows) => rows.map((r) => r.dataset.action));
    check(
      ["tenant.update", "key.create", "tenant.create", "admin_key.create"].every((a) => log.includes(a)),
      `the audit log shows what was done (${log.join(", ")})`,
    );
    await admin.screenshot({ path: path.join(args.out, "admin-tenant.png"), fullPage: true });
    await admin.close();
  }

  // Delete the chat.
  await page.click("li.current button.delete");
  await page.waitForSelector("#empty:not([hidden])");
  check((await rest(`/api/v1/chats/user/${USER}`)).chats.length === 0, "the chat is deleted");

  // Replies are rendered as Markdown, safely: a chat brought in through the import API with a
  // reply holding a heading, lists, a code block, a table, links and script payloads.
  {
    const reply = [
      "## Plan",
      "",
      "Some **bold** and *leaning* text with `inline code`.",
      "",
      "- first item",
      "- second item",
      "  - nested item",
      "",
      "1. one",
      "2. two",
      "",
      "```js",
      'console.log("<b>hi</b>");',
      "```",
      "",
      "| name | n |",
      "|------|--:|",
      "| a    | 1 |",
      "",
      '[safe](https://example.com/x) [bad](javascript:window.__xss=3) <img src=x onerror="window.__xss=1"> <script>window.__xss=2</script>',
    ].join("\n");
    const r = await fetch(`${base}/api/v1/chats/import`, {
      method: "POST",
      headers: { "X-API-Key": KEY, "Content-Type": "application/json" },
      body: JSON.stringify({
        user_id: USER,
        title: "Rendered",
        messages: [
          { role: "user", content: "<b>not bold</b> **as typed**" },
          { role: "assistant", content: reply },
        ],
      }),
    });
    check(r.status === 201, "a chat with a Markdown reply is imported");
    await page.reload();
    await page.click("#chats button.open >> text=Rendered");
    const md = "li.msg.assistant .text.md";
    await page.waitForSelector(`${md} h2`);
    check((await page.textContent(`${md} h2`)) === "Plan", "a heading is a heading");
    check((await page.textContent(`${md} strong`)) === "bold" && (await page.textContent(`${md} em`)) === "leaning", "emphasis is rendered");
    check((await page.$$(`${md} > ul > li`)).length === 2 && (await page.$$(`${md} > ul > li > ul > li`)).length === 1, "a list with a nested list");
    check((await page.$$(`${md} > ol > li`)).length === 2, "a numbered list");
    check((await page.textContent(`${md} pre code`)) === 'console.log("<b>hi</b>");', "a code block keeps its text, tags included");
    check((await page.getAttribute(`${md} pre code`, "data-lang")) === "js" && (await page.isVisible(`${md} .code button.copy`)), "the code block has its language and a copy button");
    check((await page.$$(`${md} table th`)).length === 2 && (await page.textContent(`${md} table td:last-child`)) === "1", "a table");
    const links = await page.$$eval(`${md} a`, (as) => as.map((a) => [a.getAttribute("href"), a.rel, a.target]));
    check(
      links.length === 1 && links[0][0] === "https://example.com/x" && links[0][1] === "noopener noreferrer" && links[0][2] === "_blank",
      `only the safe link is a link, opening apart (${JSON.stringify(links)})`,
    );
    check((await page.$$(`${md} img, ${md} script, li.msg b`)).length === 0, "no HTML from messages becomes elements");
    check((await page.textContent(md)).includes('<img src=x onerror="window.__xss=1">'), "an HTML payload shows as text");
    check((await page.evaluate(() => window.__xss)) === undefined, "no payload ran");
    check((await page.textContent("li.msg.user .text")) === "<b>not bold</b> **as typed**", "what the user typed is shown as typed");
    await page.screenshot({ path: path.join(args.out, "markdown.png") });

    // Search: the chat is found by a word of its reply, the word marked in the passage.
    await page.fill("#search", "nested");
    await page.waitForSelector("#chats .snippet mark");
    check((await page.textContent("#chats .snippet mark")) === "nested", "search shows the matching passage, the word marked");
    await page.fill("#search", "dragon");
    await page.waitForFunction(() => document.querySelectorAll("#chats li").length === 0);
    check(true, "a word no chat holds lists none");
    await page.fill("#search", "");
    await page.waitForSelector("#chats li >> text=messages");

    // Regenerate the reply: a new one beside it ("2/2"), and ‹ goes back to the first.
    const { chats: [rendered] } = await rest(`/api/v1/chats/user/${USER}`);
    await fetch(`${base}/api/v1/chats/${rendered.id}`, {
      method: "PATCH",
      headers: { "X-API-Key": KEY, "Content-Type": "application/json" },
      body: JSON.stringify({ config: { temperature: 0, max_tokens: 24 } }),
    });
    await page.click("li.msg.assistant button.regenerate");
    await page.waitForSelector("li.msg.assistant .tools .pos >> text=2/2");
    await page.waitForSelector("li.msg.assistant.complete button.regenerate", { timeout: 60000 });
    check((await page.$$(`${md} h2`)).length === 0, "the new reply is shown in place of the old one");
    await page.click("li.msg.assistant .tools button.prev");
    await page.waitForSelector(`${md} h2`);
    check((await page.textContent("li.msg.assistant .tools .pos")) === "1/2", "the first reply is kept and shown again");

    // Edit the question: a new branch with its own reply; the question shows "2/2".
    await page.click("li.msg.user button.edit");
    await page.fill("li.msg.user textarea.edit-box", "Name a colour.");
    await page.click("li.msg.user button.save");
    await page.waitForSelector("li.msg.user .tools .pos >> text=2/2");
    await page.waitForSelector("li.msg.assistant.complete button.regenerate", { timeout: 60000 });
    check((await page.textContent("li.msg.user .text")) === "Name a colour.", "the edited question is shown");
    const tree = await rest(`/api/v1/chats/${rendered.id}/messages?branch=all`);
    check(tree.total === 5, `every version is kept (${tree.total} messages)`);
    check((await rest(`/api/v1/chats/${rendered.id}`)).message_count === 2, "the chat counts the branch shown");

    // Export the branch shown as Markdown.
    const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export-md")]);
    check(download.suggestedFilename() === "Rendered.md", `the export is named after the chat (${download.suggestedFilename()})`);
    const exported = readFileSync(await download.path(), "utf8");
    check(exported.startsWith("# Rendered\n") && exported.includes("Name a colour.") && !exported.includes("## Plan"), "the export holds the branch shown");
    await page.screenshot({ path: path.join(args.out, "branches.png") });

    // Export the whole chat as JSON and import it again from the page: a second chat with
    // the same branches.
    const [asJson] = await Promise.all([page.waitForEvent("download"), page.click("#export-json")]);
    check(asJson.suggestedFilename() === "Rendered.json", `the JSON export is named after the chat (${asJson.suggestedFilename()})`);
    await page.setInputFiles("#import-file", await asJson.path());
    await page.waitForFunction(() => document.querySelectorAll("#chats li").length === 2);
    const { chats: both } = await rest(`/api/v1/chats/user/${USER}`);
    const copy = both.find((c) => c.id !== rendered.id);
    check(copy && copy.title === "Rendered" && copy.message_count === 2, "the imported chat is listed, its branch shown");
    check((await rest(`/api/v1/chats/${copy.id}/messages?branch=all`)).total === 5, "the imported chat keeps every version");
    const { messages: [copiedQuestion] } = await rest(`/api/v1/chats/${copy.id}/messages?limit=1`);
    await page.waitForSelector(`li.msg.user[data-id="${copiedQuestion.id}"] .tools .pos >> text=2/2`);
    check(true, "the imported chat is opened, its question showing both versions");
  }

  check(consoleErrors.length === 0, `no console errors (${consoleErrors.join(" | ")})`);
  console.log(`screenshots: ${args.out}/chat.png, after-restart.png, admin.png, admin-tenant.png, markdown.png, branches.png`);
} catch (e) {
  failed = true;
  console.error(e);
  console.error("--- server log ---\n" + serverLog);
} finally {
  if (browser) await browser.close();
  await stopServer();
  rmSync(data, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
