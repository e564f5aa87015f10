// The dashboard in headless Chromium (Debian's /usr/bin/chromium), driven by playwright-core:
// the figures load, "Clear cache" empties the cache without a reload, the TTL form changes the
// setting, and the page follows changes made behind its back (server-sent events).
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

const server = spawn(example, [], { stdio: ["pipe", "pipe", "inherit"] });
const url = await new Promise((resolve, reject) => {
  createInterface({ input: server.stdout }).on("line", (line) => {
    const found = line.match(/^dashboard: (\S+)/);
    if (found) resolve(found[1]);
  });
  server.on("exit", (code) => reject(new Error(`the example exited with ${code}`)));
  setTimeout(() => reject(new Error("the example never printed its URL")), 60000);
});

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
    const table = await (await fetch(new URL("api/counters", url))).json();
    const rows = await page.locator("#counters-table tr").count();
    if (rows !== table.length || rows < 14) throw new Error(`${rows} rows for ${table.length} counters`);
    const hits = await page.textContent("#counters-table tr[data-counter=hits] td.num");
    if (hits !== "1") throw new Error(`hits ${hits}`);
  });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  await check("Clear cache empties the cache without a reload", async () => {
    await page.evaluate(() => { window.sameDocument = true; });
    await page.click("#clear");
    await waitText(page, "entries-count", "0");
    await page.waitForSelector("text=The cache is empty.", { timeout: 15000 });
    if (!(await page.evaluate(() => window.sameDocument))) throw new Error("the page reloaded");
  });

  await check("the TTL form changes the setting", async () => {
    await page.fill("#ttl", "2.5");
    await page.click("#config button[type=submit]");
    await page.waitForSelector("text=Settings applied.", { timeout: 15000 });
    const stats = await (await fetch(new URL("api/stats", url))).json();
    if (stats.default_ttl_hours !== 2.5) throw new Error(`default_ttl_hours ${stats.default_ttl_hours}`);
  });

  await check("the page follows a download made behind its back", async () => {
    const response = await fetch(new URL("files/mr_0007.nii.gz", url));
    await response.arrayBuffer();
    await waitText(page, "entries-count", "1");
  });
} finally {
  await browser.close();
  server.stdin.end();
  server.kill();
}
console.log(`browser test took ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
