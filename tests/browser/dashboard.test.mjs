// The dashboard in headless Chromium (Debian's /usr/bin/chromium), driven by playwright-core:
// the figures load; the plots draw the server's history and change as downloads happen, and
// a reload draws the same; a download in progress shows its bar, speed and time left;
// "Clear cache" asks and then empties the cache without a reload; the TTL form changes the
// setting; the page follows changes made behind its back (server-sent events); the entry
// table searches, sorts and pages 200 entries; with an admin token it logs in through its
// form; axe-core finds no serious or critical accessibility violation; and the page breaks
// none of its Content-Security-Policy.
//
//   cargo build --all-features --example dashboard && (cd tests/browser && npm ci && npm test)
//   IMGCACHE_SCREENSHOT=docs/dashboard.png npm test   also writes the README's screenshot, after
//                                                     half a minute of traffic for the plots
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const root = new URL("../../", import.meta.url).pathname;
const example = process.env.IMGCACHE_DASHBOARD_BIN || `${root}target/debug/examples/dashboard`;
const axePath = new URL("node_modules/axe-core/axe.min.js", import.meta.url).pathname;
// Relative to the repository's root.
const screenshot = process.env.IMGCACHE_SCREENSHOT && new URL(process.env.IMGCACHE_SCREENSHOT, `file://${root}`).pathname;
const started = Date.now();
const MIB = 1024 * 1024;

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
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const waitText = (page, id, text) =>
  page.waitForFunction(
    ([id, text]) => document.getElementById(id).textContent === text,
    [id, text],
    { timeout: 15000 },
  );
// Waits until `probe()` (in node) returns something truthy; returns it.
async function until(what, probe, timeout = 15000) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await probe();
    if (last) return last;
    await sleep(50);
  }
  throw new Error(`${what}: not within ${timeout / 1000} s`);
}

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
function stop(instance) {
  instance.server.stdin.end();
  instance.server.kill();
}
// The router's own URLs: the example nests it at /cache (no trailing slash), the mount point.
const under = (page, path) => new URL(path, page.replace(/\/*$/, "/"));
const getJson = async (base, path) => (await fetch(under(base, path))).json();

// Serious and critical violations that axe-core finds in `page` as it is now. The page's CSP
// allows only its own script, so axe is injected in a context that bypasses CSP.
async function axeViolations(page) {
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.addScriptTag({ path: axePath });
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.impact} ${v.id} (${v.help}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
}
async function noSeriousViolation(page) {
  const found = await axeViolations(page);
  if (found.length) throw new Error(`axe-core:\n  ${found.join("\n  ")}`);
}

// The plots' figures, as the page states them on its SVGs.
const plotData = (page) =>
  page.evaluate(() => {
    const hit = document.getElementById("hit-plot"), b = document.getElementById("bytes-plot");
    const down = b.querySelector("polyline.down, circle.down");
    return {
      requests: +hit.dataset.requests, hits: +hit.dataset.hits, hitPoints: +hit.dataset.points,
      fromCache: +b.dataset.fromCache, downloaded: +b.dataset.downloaded, bytePoints: +b.dataset.points,
      downLine: down ? down.getAttribute("points") || `${down.getAttribute("cx")},${down.getAttribute("cy")}` : "",
      // The top of the downloaded line, in SVG units (smaller is higher; the baseline is 168).
      downTop: Math.min(...[...b.querySelectorAll("polyline.down")].flatMap((l) =>
        l.getAttribute("points").split(" ").map((p) => +p.split(",")[1]))),
    };
  });
// The row of a download in progress, as shown.
const downloadRow = (page, name) =>
  page.evaluate((name) => {
    const row = [...document.querySelectorAll("#downloads-table tr")].find((r) => r.dataset.url?.endsWith(name));
    if (!row) return null;
    const bar = row.querySelector("[role=progressbar]");
    return {
      received: row.cells[1].textContent, percent: bar && +bar.getAttribute("aria-valuenow"),
      label: bar?.getAttribute("aria-label"), speed: row.cells[3].textContent, left: row.cells[4].textContent,
    };
  }, name);
// The entry table as shown: its rows' URLs and cells, the pager's texts.
const entryTable = (page) =>
  page.evaluate(() => ({
    urls: [...document.querySelectorAll("#entries-table tr")].map((r) => r.dataset.url).filter(Boolean),
    hits: [...document.querySelectorAll("#entries-table tr")].filter((r) => r.dataset.url).map((r) => +r.cells[5].textContent),
    pageOf: document.getElementById("page-of").textContent,
    status: document.getElementById("entries-status").textContent,
    sorted: [...document.querySelectorAll("#entries th[aria-sort]")].map((th) => `${th.dataset.sort} ${th.getAttribute("aria-sort")}`),
  }));
const sameList = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

const main = startExample({ IMGCACHE_EXAMPLE_HISTORY_MS: "1000" });
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
  const cspErrors = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) cspErrors.push(m.text()); });
  await page.goto(url);

  await check("the figures and entries are shown", async () => {
    if (new URL(url).pathname !== "/cache") throw new Error(`the example serves the page at ${url}`);
    await waitText(page, "entries-count", "3");
    await waitText(page, "live", "live");
    const rate = await page.textContent("#hit-rate");
    if (rate !== "25.0 %") throw new Error(`hit rate ${rate}`);
    const reuse = await page.textContent("#reuse-rate");
    if (reuse !== "25.0 %") throw new Error(`served without download ${reuse}`);
    const rows = await page.locator("#entries-table tr").count();
    if (rows !== 3) throw new Error(`${rows} rows`);
    const size = await page.textContent("#size");
    if (size !== "48 / 100 MB") throw new Error(`size ${size}`);
  });
  await check("the counters table shows every counter of the cache's table", async () => {
    const table = await getJson(url, "api/counters");
    const rows = await page.locator("#counters-table tr").count();
    if (rows !== table.length || rows < 14) throw new Error(`${rows} rows for ${table.length} counters`);
    const hits = await page.textContent("#counters-table tr[data-counter=hits] td.num");
    if (hits !== "1") throw new Error(`hits ${hits}`);
  });

  await check("the plots draw the server's history", async () => {
    const history = await getJson(url, "api/history");
    if (history.interval_ms !== 1000 || history.capacity !== 360) throw new Error(`history ${JSON.stringify(history).slice(0, 200)}`);
    // A sample a second: within a few, the bytes plot has two lines of points (at zero); the
    // hit rate has none where there was no request.
    const d = await until("points in the bytes plot", async () => {
      const d = await plotData(page);
      return d.bytePoints >= 6 && d;
    });
    if (d.downloaded !== 0 || d.requests !== 0 || d.hitPoints !== 0) throw new Error(`traffic before any: ${JSON.stringify(d)}`);
    const caption = await page.textContent("#hit-caption");
    if (!/no requests in \d+ (s|min)$/.test(caption)) throw new Error(`caption ${caption}`);
  });

  const slow = "pet_0100.nii.gz";
  let plotsBefore;
  let download;
  await check("a download in progress shows its bar, speed and time left", async () => {
    plotsBefore = await plotData(page);
    download = fetch(under(url, `files/${slow}`)).then((r) => r.arrayBuffer());
    const row = await until("a row with a speed and a time left", async () => {
      const r = await downloadRow(page, slow);
      return r && r.percent > 0 && r.percent < 100 && /\/s$/.test(r.speed) && /^\d+ s$/.test(r.left) && r;
    });
    if (!/ \/ 16\.0 MB$/.test(row.received)) throw new Error(`received ${row.received}`);
    if (!row.label?.includes(slow)) throw new Error(`progress bar label ${row.label}`);
    const speed = parseFloat(row.speed);
    if (!/MB\/s$/.test(row.speed) || speed < 1 || speed > 8) throw new Error(`speed ${row.speed} (the origin sends 4 MiB/s)`);
    const reloaded = await browser.newPage();
    try {
      await reloaded.goto(url);
      await until("the download on a page loaded in its middle", () => downloadRow(reloaded, slow));
    } finally {
      await reloaded.close();
    }
    if ((await download).byteLength !== 16 * MIB) throw new Error("short body");
    await until("the row gone once it is done", async () => !(await downloadRow(page, slow)));
  });

  await check("the plots change as downloads and hits happen", async () => {
    if (!download) throw new Error("no download to plot");
    await download;
    const after = await until("the download in the bytes plot", async () => {
      const d = await plotData(page);
      return d.downloaded === plotsBefore.downloaded + 16 * MIB && d;
    });
    if (after.downLine === plotsBefore.downLine) throw new Error("the downloaded line did not move");
    if (!(after.downTop < 160)) throw new Error(`the downloaded line stays at the baseline (top ${after.downTop})`);
    await (await fetch(under(url, `files/${slow}`))).arrayBuffer();
    const hit = await until("the hit in the hit-rate plot", async () => {
      const d = await plotData(page);
      return d.requests === plotsBefore.requests + 2 && d.fromCache === plotsBefore.fromCache + 16 * MIB && d;
    });
    if (hit.hits !== plotsBefore.hits + 1) throw new Error(`hits ${plotsBefore.hits} -> ${hit.hits}`);
    const caption = await page.textContent("#hit-caption");
    if (!caption.includes("50.0 % of 2 requests")) throw new Error(`caption ${caption}`);
  });

  await check("a reload draws the same history: the server keeps it", async () => {
    const before = await plotData(page);
    await page.reload();
    await waitText(page, "live", "live");
    const after = await until("the plots drawn again", async () => {
      const d = await plotData(page);
      return d.bytePoints > 0 && d;
    });
    if (after.downloaded !== before.downloaded || after.requests !== before.requests)
      throw new Error(`before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`);
  });

  if (screenshot) {
    // Half a minute of traffic at a sample a second, so that the plots have a shape: hits on
    // the cached volumes, now and then one invalidated and downloaded again; then a download
    // in progress.
    const names = ["ct_0042.nii.gz", "mr_0007.nii.gz", "ct_0043.nii.gz", slow];
    const entries = await getJson(url, "api/entries");
    const again = async (name) => {
      const entry = entries.find((e) => e.url.endsWith(name));
      if (entry) await fetch(under(url, "api/entries?url=" + encodeURIComponent(entry.url)), { method: "DELETE" });
    };
    for (let i = 0; i < 30; i++) {
      if (i % 9 === 8) await again(names[(i / 9) | 0]);
      await (await fetch(under(url, `files/${names[i % 4]}`))).arrayBuffer();
      await sleep(250 + (i % 5) * 200);
    }
    await again(slow);
    const inProgress = fetch(under(url, `files/${slow}`)).then((r) => r.arrayBuffer());
    await until("a download's speed to show", async () => /\/s$/.test((await downloadRow(page, slow))?.speed));
    await sleep(800);
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(`wrote ${screenshot}`);
    await inProgress;
  }

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
    const stats = await getJson(url, "api/stats");
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
      return row ? row.cells[5].textContent : null;
    });
    const before = await hitsCell();
    let streaming = true;
    const stream = (async () => {
      while (streaming) {
        await (await fetch(under(url, "files/mr_0007.nii.gz"))).arrayBuffer();
        await sleep(40);
      }
    })();
    try {
      const deadline = Date.now() + 1500;
      while ((await hitsCell()) === before) {
        if (Date.now() > deadline) throw new Error(`hits still ${before} after 1.5 s of events`);
        await sleep(50);
      }
    } finally {
      streaming = false;
      await stream;
    }
  });

  await check("the page breaks none of its Content-Security-Policy", async () => {
    if (cspErrors.length) throw new Error(`${cspErrors.length} violations, the first: ${cspErrors[0]}`);
  });

  // A cache of 200 more entries, in a context where axe-core may be injected.
  const seeded = startExample({ IMGCACHE_EXAMPLE_ENTRIES: "200" });
  try {
    const base = await seeded.url;
    const context = await browser.newContext({ bypassCSP: true, viewport: { width: 1200, height: 860 } });
    const table = await context.newPage();
    await table.goto(base);
    await waitText(table, "entries-count", "203");

    await check("the entry table shows 203 entries 50 at a time, with page controls", async () => {
      await until("the first page", async () => (await entryTable(table)).pageOf === "Page 1 of 5");
      let t = await entryTable(table);
      if (t.urls.length !== 50 || t.status !== "1-50 of 203 entries") throw new Error(`${t.urls.length} rows, ${t.status}`);
      if (!(await table.isDisabled("#prev-page")) || (await table.isDisabled("#next-page"))) throw new Error("controls on page 1");
      const first = t.urls;
      await table.click("#next-page");
      t = await until("page 2", async () => { const t = await entryTable(table); return t.pageOf === "Page 2 of 5" && t; });
      if (t.urls.length !== 50 || t.urls.some((u) => first.includes(u))) throw new Error("page 2 repeats page 1");
      if (t.status !== "51-100 of 203 entries") throw new Error(t.status);
      await table.click("#last-page");
      t = await until("the last page", async () => { const t = await entryTable(table); return t.pageOf === "Page 5 of 5" && t; });
      if (t.urls.length !== 3 || !(await table.isDisabled("#next-page"))) throw new Error(`${t.urls.length} rows on the last page`);
      await table.selectOption("#page-size", "100");
      t = await until("100 a page", async () => { const t = await entryTable(table); return t.pageOf === "Page 1 of 3" && t; });
      if (t.urls.length !== 100) throw new Error(`${t.urls.length} rows at 100 a page`);
      await table.selectOption("#page-size", "50");
      await until("50 a page again", async () => (await entryTable(table)).pageOf === "Page 1 of 5");
    });

    await check("the search keeps the entries whose URL contains the text", async () => {
      await table.fill("#search", "S_001");
      const t = await until("ten matches", async () => { const t = await entryTable(table); return t.urls.length === 10 && t; });
      if (!t.urls.every((u) => /small\/s_001\d\.nii\.gz$/.test(u))) throw new Error(t.urls.join(" "));
      if (t.status !== "1-10 of 10 matching entries" || t.pageOf !== "Page 1 of 1") throw new Error(`${t.status}, ${t.pageOf}`);
      await table.fill("#search", "no such file");
      await table.waitForSelector("text=No entry matches.", { timeout: 15000 });
      await table.fill("#search", "");
      await until("every entry again", async () => (await entryTable(table)).status === "1-50 of 203 entries");
    });

    await check("a column header sorts the table, and says so with aria-sort", async () => {
      const t0 = await entryTable(table);
      if (!sameList(t0.sorted, ["age ascending"])) throw new Error(`sorted by ${t0.sorted} at first`);
      const bySize = async (order) => (await getJson(base, `api/entries?sort=size&order=${order}&limit=50`)).map((e) => e.url);
      await table.click("#entries th[data-sort=size] button");
      let t = await until("smallest first", async () => { const t = await entryTable(table); return sameList(t.sorted, ["size ascending"]) && t; });
      if (!sameList(t.urls, await bySize("asc"))) throw new Error("not the smallest 50");
      await table.click("#entries th[data-sort=size] button");
      t = await until("largest first", async () => { const t = await entryTable(table); return sameList(t.sorted, ["size descending"]) && t; });
      await until("the largest 50", async () => sameList((await entryTable(table)).urls, await bySize("desc")));
      await table.click("#entries th[data-sort=hits] button");
      await table.click("#entries th[data-sort=hits] button");
      t = await until("most hits first", async () => { const t = await entryTable(table); return sameList(t.sorted, ["hits descending"]) && t.hits[0] === 2 && t; });
      if (t.hits.some((h, i) => i && h > t.hits[i - 1])) throw new Error(`hits ${t.hits}`);
      await table.click("#entries th[data-sort=url] button");
      t = await until("by URL", async () => { const t = await entryTable(table); return sameList(t.sorted, ["url ascending"]) && t; });
      if (!sameList(t.urls, [...t.urls].sort())) throw new Error("not in URL order");
    });

    await check("numeric columns are aligned right, with their headers", async () => {
      const misaligned = await table.evaluate(() => {
        const heads = [...document.querySelectorAll("#entries thead th")];
        const row = document.querySelector("#entries-table tr");
        const out = [];
        heads.forEach((th, i) => {
          if (!["size", "age", "expires", "used", "hits"].includes(th.dataset.sort)) return;
          const cell = row.cells[i];
          const right = (node) => {
            const range = document.createRange();
            range.selectNodeContents(node);
            return range.getBoundingClientRect().right;
          };
          // The header's label (its sort arrow is on its left), against the cell's text.
          const label = [...th.querySelector("button").childNodes].find((n) => n.nodeType === Node.TEXT_NODE);
          const text = right(cell), head = right(label);
          if (getComputedStyle(cell).textAlign !== "right" || getComputedStyle(th).textAlign !== "right" || Math.abs(text - head) > 2)
            out.push(`${th.dataset.sort}: cell ends at ${text}, header at ${head}`);
        });
        return out;
      });
      if (misaligned.length) throw new Error(misaligned.join("; "));
    });

    await check("axe-core: no serious or critical violation, with the table, plots and a download", async () => {
      const slowDownload = fetch(under(base, `files/${slow}`)).then((r) => r.arrayBuffer());
      await until("the download's row", async () => (await downloadRow(table, slow))?.percent > 0);
      await noSeriousViolation(table);
      await slowDownload;
    });
    await context.close();
  } finally {
    stop(seeded);
  }

  await check("with an admin token the page logs in through a form, never the URL", async () => {
    const guarded = startExample({ IMGCACHE_ADMIN_TOKEN: "s3cret-token" });
    try {
      const context = await browser.newContext({ bypassCSP: true });
      const page = await context.newPage();
      const base = await guarded.url;
      await page.goto(base);
      await page.waitForSelector("#login:not([hidden])", { timeout: 15000 });
      if ((await page.textContent("#entries-count")) !== "-") throw new Error("figures shown before login");
      await noSeriousViolation(page);
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
      await until("the plots after login", async () => (await plotData(page)).bytePoints > 0);
      await context.close();
    } finally {
      stop(guarded);
    }
  });
} finally {
  await browser.close();
  stop(main);
}
console.log(`browser test took ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
