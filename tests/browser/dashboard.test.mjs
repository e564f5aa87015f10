// The dashboard in headless Chromium (Debian's /usr/bin/chromium), driven by playwright-core:
// the figures load, "Clear cache" asks and then empties the cache without a reload, the TTL
// form changes the setting, the page follows changes made behind its back (server-sent
// events), and with an admin token it logs in through its form.
//
//   cargo build --example dashboard && (cd tests/browser && npm install && npm test)
//   IMGCACHE_SCREENSHOT=docs/dashboard.png ...   also writes the screenshot shown in the README
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const root = new URL("../../", import.meta.url).pathname;
const example = process.env.IMGCACHE_DASHBOARD_BIN || `${root}target/debug/examples/dashboard`;
const screenshot = process.env.IMGCACHE_SCREENSHOT;
const started = Date.now();

let passed = 0;
let failed = 0;
async function check(name, body) {
  try {
    await body();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.message}`);
  }
}
const waitText = (page, id, text) =>
  page.waitForFunction(
    ([id, text]) => document.getElementById(id).textContent === text,
    [id, text],
    { timeout: 15000 },
  );

function startExample(env = {}) {
  const server = spawn(example, [], { stdio: ["pipe", "pipe", "inherit"], env: { ...process.env, ...env } });
  const url = new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).on("line", (line) => {
      const found = line.match(/^dashboard: (\S+)/);
      if (found) resolve(found[1]);
    });
    server.on("exit", (code) => reject(new Error(`the example exited with ${code}`)));
    setTimeout(() => reject(new Error("the example never printed its URL")), 60000);
  });
  return { server, url };
}
// The router's own URLs: the example nests it at /cache (no trailing slash), the mount point.
const under = (page, path) => new URL(path, page.replace(/\/*$/, "/"));
const main = startExample();
const server = main.server;
const url = await main.url;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 860 } });
  await page.goto(url);

  await check("the figures and entries are shown", async () => {
    if (new URL(url).pathname !== "/cache") throw new Error(`the example serves the page at ${url}`);
    await waitText(page, "entries-count", "3");
    await waitText(page, "live", "live");
    const rate = await page.textContent("#hit-rate");
    if (rate !== "25.0 %") throw new Error(`hit rate ${rate}`);
    const rows = await page.locator("#entries-table tr").count();
    if (rows !== 3) throw new Error(`${rows} rows`);
    const size = await page.textContent("#size");
    if (size !== "48 / 100 MB") throw new Error(`size ${size}`);
  });
  await check("the counters table shows every counter of the cache's table", async () => {
    const table = await (await fetch(under(url, "api/counters"))).json();
    const rows = await page.locator("#counters-table tr").count();
    if (rows !== table.length || rows < 14) throw new Error(`${rows} rows for ${table.length} counters`);
    const hits = await page.textContent("#counters-table tr[data-counter=hits] td.num");
    if (hits !== "1") throw new Error(`hits ${hits}`);
  });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  await check("Clear cache asks first, then empties the cache without a reload", async () => {
    await page.evaluate(() => { window.sameDocument = true; });
    let asked = "";
    page.once("dialog", (dialog) => { asked = dialog.message(); dialog.accept(); });
    await page.click("#clear");
    if (!asked.includes("Remove every cached file")) throw new Error(`asked ${JSON.stringify(asked)}`);
    await waitText(page, "entries-count", "0");
    await page.waitForSelector("text=The cache is empty.", { timeout: 15000 });
    if (!(await page.evaluate(() => window.sameDocument))) throw new Error("the page reloaded");
  });

  await check("the TTL form changes the setting", async () => {
    await page.fill("#ttl", "2.5");
    await page.click("#config button[type=submit]");
    await page.waitForSelector("text=Settings applied.", { timeout: 15000 });
    const stats = await (await fetch(under(url, "api/stats"))).json();
    if (stats.default_ttl_hours !== 2.5) throw new Error(`default_ttl_hours ${stats.default_ttl_hours}`);
  });

  await check("the page follows a download made behind its back", async () => {
    const response = await fetch(under(url, "files/mr_0007.nii.gz"));
    await response.arrayBuffer();
    await waitText(page, "entries-count", "1");
  });

  await check("under a steady stream of events the entry table still refreshes", async () => {
    const hitsCell = () => page.evaluate(() => {
      const row = [...document.querySelectorAll("#entries-table tr")].find((r) => r.dataset.url?.endsWith("mr_0007.nii.gz"));
      return row ? row.cells[4].textContent : null;
    });
    const before = await hitsCell();
    let streaming = true;
    const stream = (async () => {
      while (streaming) {
        await (await fetch(under(url, "files/mr_0007.nii.gz"))).arrayBuffer();
        await new Promise((r) => setTimeout(r, 40));
      }
    })();
    try {
      const deadline = Date.now() + 1500;
      while ((await hitsCell()) === before) {
        if (Date.now() > deadline) throw new Error(`hits still ${before} after 1.5 s of events`);
        await new Promise((r) => setTimeout(r, 50));
      }
    } finally {
      streaming = false;
      await stream;
    }
  });

  await check("with an admin token the page logs in through a form, never the URL", async () => {
    const guarded = startExample({ IMGCACHE_ADMIN_TOKEN: "s3cret-token" });
    try {
      const page = await browser.newPage();
      const base = await guarded.url;
      await page.goto(base);
      await page.waitForSelector("#login:not([hidden])", { timeout: 15000 });
      if ((await page.textContent("#entries-count")) !== "-") throw new Error("figures shown before login");
      await page.fill("#token", "wrong");
      await page.click("#login-form button[type=submit]");
      await page.waitForSelector("text=wrong admin token", { timeout: 15000 });
      await page.fill("#token", "s3cret-token");
      await page.click("#login-form button[type=submit]");
      await waitText(page, "entries-count", "3");
      await waitText(page, "live", "live");
      if (page.url().includes("s3cret")) throw new Error(`token in the URL ${page.url()}`);
      const visible = await page.evaluate(() => document.cookie);
      if (visible.includes("s3cret")) throw new Error("the token cookie is readable by the page");
      const anonymous = await fetch(under(base, "api/entries"));
      if (anonymous.status !== 401) throw new Error(`api/entries without the token: ${anonymous.status}`);
    } finally {
      guarded.server.stdin.end();
      guarded.server.kill();
    }
  });
} finally {
  await browser.close();
  server.stdin.end();
  server.kill();
}
console.log(`browser test took ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
