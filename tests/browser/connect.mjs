// Drives a real headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core) through `connect`'s approval flow, as a person would:
//
//   node tests/browser/connect.mjs <url> <click> <screenshot.png>
//
// <url>: the link connect printed (or any URL to open); <click>: `allow` or
// `deny` (the button to click on the emulator's approval page), or `none` (just
// open the URL: a forged redirect). The browser then follows Dropbox's redirect
// to connect's loopback page and waits there until the page shows a final
// outcome (not `pending`), takes a screenshot and prints one JSON line:
// {"url", "status", "outcome", "title", "message", "next", "command"}.
import { chromium } from "playwright-core";

const [url, click, screenshot] = process.argv.slice(2);
if (!url || !["allow", "deny", "none"].includes(click) || !screenshot) {
  console.error("usage: connect.mjs <url> allow|deny|none <screenshot.png>");
  process.exit(2);
}

// The flags that work on a closed network (no background connections to
// Google's hosts, which this machine refuses) and as root (no sandbox).
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 520 } });
  let response = await page.goto(url);
  if (click !== "none") {
    // The emulator's approval page: click and follow the redirect to connect.
    [response] = await Promise.all([
      page.waitForNavigation(),
      page.click(`#${click}`),
    ]);
  }
  await page.waitForFunction(
    () => document.body && document.body.dataset.outcome && document.body.dataset.outcome !== "pending",
    null,
    { timeout: 120_000, polling: 200 },
  );
  const text = async (id) => (await page.textContent(`#${id}`))?.trim() ?? "";
  const result = {
    url: page.url(),
    status: response ? response.status() : 0,
    outcome: await page.evaluate(() => document.body.dataset.outcome),
    title: await text("title"),
    message: await text("message"),
    next: await text("next"),
    command: await text("command"),
  };
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
