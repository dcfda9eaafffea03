// The operator page (/admin/ on the admin listener) in headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core), as an operator uses it: it asks for the
// admin token, says so when a wrong one is typed and asks again, then with the right one shows
// live relay rates while the pytest side sends traffic; the allocations table lists USER,
// whose Revoke button (confirmed in the page's own dialog, default period) ends its allocation.
//
// With TOKEN "-" (an appliance without admin.token, loopback only) the page must show its
// board without asking, list USER, and report the appliance's refusal when Revoke is clicked.
//
// usage: node operator_page.js ADMIN_URL TOKEN OUT_DIR USER OTHER_USER
// Prints one JSON line with what the page showed; the pytest side asserts on it and on the
// appliance.  Screenshots: OUT_DIR/operator-page.png (live, before the revoke) and
// OUT_DIR/operator-page-revoked.png (OUT_DIR/operator-page-no-token.png with TOKEN "-").
'use strict';

const path = require('path');
const { chromium } = require('playwright-core');
const { CHROMIUM_ARGS } = require('./chromium_args');

const [base, token, outDir, user, otherUser] = process.argv.slice(2);
const STEP_MS = 30000;

// The latest values a chart shows ({series: value}), from the figure's data-last.
async function chartNow(page, id) {
  return JSON.parse(await page.getAttribute(`#chart-${id}`, 'data-last'));
}

async function withoutToken(page, result) {
  await page.waitForSelector('#board:not([hidden])', { timeout: STEP_MS });
  result.loginHidden = await page.isHidden('#login');
  const row = page.locator(`#allocations tr[data-user="${user}"]`);
  await row.first().waitFor({ timeout: STEP_MS });
  result.allocationsNow = await chartNow(page, 'allocations');
  result.secretsNote = await page.textContent('#secrets-note');
  result.rotateDisabled = await page.isDisabled('#rotate');
  await row.first().locator('button.revoke').click();
  await page.waitForSelector('#confirm[open]', { timeout: STEP_MS });
  await page.click('#confirm-ok');
  await page.waitForSelector('#action-status:not([hidden])', { timeout: STEP_MS });
  result.actionState = await page.getAttribute('#action-status', 'data-state');
  result.actionStatus = await page.textContent('#action-status');
  result.statusAfter = await page.getAttribute('#status', 'data-state');
  await page.screenshot({ path: path.join(outDir, 'operator-page-no-token.png'), fullPage: true });
}

async function withToken(page, result) {
  await page.waitForSelector('#login:not([hidden])', { timeout: STEP_MS });
  result.askedForToken = (await page.getAttribute('#login', 'data-reason')) || 'token-needed';

  await page.fill('#token-input', `${token}-wrong`);
  await page.click('#login-submit');
  await page.waitForSelector('#login[data-reason="wrong-token"]:not([hidden])', { timeout: STEP_MS });
  result.wrongTokenMessage = await page.textContent('#login-message');

  await page.fill('#token-input', token);
  await page.click('#login-submit');
  await page.waitForSelector('#board:not([hidden])', { timeout: STEP_MS });
  result.tokenKept = await page.evaluate(() => sessionStorage.getItem('appliance-admin-token') !== null);

  // Live rates: both directions non-zero on the bits and the packets charts.
  await page.waitForFunction(() => {
    const last = (id) => JSON.parse(document.getElementById(`chart-${id}`).dataset.last);
    const bits = last('relay-bits');
    const packets = last('relay-packets');
    return bits.to_peer > 0 && bits.to_client > 0 && packets.to_peer > 0 && packets.to_client > 0;
  }, null, { timeout: STEP_MS, polling: 250 });
  result.bits = await chartNow(page, 'relay-bits');
  result.packets = await chartNow(page, 'relay-packets');
  result.allocationsNow = await chartNow(page, 'allocations');
  result.tileToPeer = await page.getAttribute('#now-to-peer', 'data-value');
  result.canvases = await page.locator('#charts canvas').count();

  const row = page.locator(`#allocations tr[data-user="${user}"]`);
  await row.first().waitFor({ timeout: STEP_MS });
  await page.locator(`#allocations tr[data-user="${otherUser}"]`).first().waitFor({ timeout: STEP_MS });
  result.listedBefore = await page.locator('#allocations tbody tr[data-user]').evaluateAll(
    (rows) => rows.map((r) => r.dataset.user));
  result.allocationHeaders = await page.locator('#allocations thead th').allTextContents();
  await page.waitForTimeout(2500); // one more poll, so the charts have a few points to show
  result.secretsListed = await page.locator('#secrets tbody td').count() > 1;
  result.statusBefore = await page.getAttribute('#status', 'data-state');
  await page.screenshot({ path: path.join(outDir, 'operator-page.png'), fullPage: true });

  await row.first().locator('button.revoke').click();
  await page.waitForSelector('#confirm[open]', { timeout: STEP_MS });
  result.confirmText = await page.textContent('#confirm-text');
  result.confirmPeriod = await page.inputValue('#confirm-period');
  await page.click('#confirm-ok');
  await page.waitForSelector('#action-status:not([hidden])', { timeout: STEP_MS });
  result.actionState = await page.getAttribute('#action-status', 'data-state');
  result.actionStatus = await page.textContent('#action-status');

  await row.first().waitFor({ state: 'detached', timeout: STEP_MS });
  await page.locator(`#revocations tr[data-user="${user}"]`).first().waitFor({ timeout: STEP_MS });
  result.listedAfter = await page.locator('#allocations tbody tr[data-user]').evaluateAll(
    (rows) => rows.map((r) => r.dataset.user));
  result.revocationRow = await page.locator(`#revocations tr[data-user="${user}"] td`).allTextContents();
  result.statusAfter = await page.getAttribute('#status', 'data-state');
  await page.screenshot({ path: path.join(outDir, 'operator-page-revoked.png'), fullPage: true });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium', headless: true,
    args: process.getuid && process.getuid() === 0 ? [...CHROMIUM_ARGS, '--no-sandbox'] : CHROMIUM_ARGS,
  });
  const result = { errors: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
    const page = await context.newPage();
    // A CSP violation, a failed script or an uncaught exception is a console error: the test
    // fails on any.  Chromium also logs every 401 and 403 the page reads (the wrong token's,
    // the refusals without admin.token): those are expected, and the page shows them.
    page.on('console', (msg) => {
      if (msg.type() === 'error' && !/status of 40[13]/.test(msg.text())) result.errors.push(msg.text());
    });
    page.on('pageerror', (err) => result.errors.push(String(err)));

    await page.goto(`${base}/`); // redirected to /admin/
    result.url = page.url();
    await (token === '-' ? withoutToken(page, result) : withToken(page, result));
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
