// A real call in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core)
// through the appliance's demo page: user A in one browser context, user B in another with
// two tabs.  A calls B relay-only, posing as "carol" in the free-text callerUserName; both of
// B's tabs ring, showing A's real user id with the pose beside it, marked self-declared; the
// second answers and the first stops ringing; both sides connect and decode video; A hangs up and B sees it.
//
// usage: node browser_call.js BASE_URL TRANSPORT OUT_DIR TOKEN_A TOKEN_B
// Prints one JSON line with what each side saw; the pytest side asserts on it.
'use strict';

const path = require('path');
const { chromium } = require('playwright-core');

const [base, transport, outDir, tokenA, tokenB] = process.argv.slice(2);
const STEP_MS = 30000;

const { CHROMIUM_ARGS } = require('./chromium_args');

async function openDemo(context, user, token) {
  const page = await context.newPage();
  page.on('console', (msg) => { if (msg.type() === 'error') console.error(`[${user}] ${msg.text()}`); });
  await page.goto(`${base}/imserver/demo/?relay=1`);
  await page.fill('#user', user);
  await page.fill('#token', token);
  await page.selectOption('#transport', transport);
  await page.click('#connect');
  await page.waitForSelector('#status[data-state="connected"]', { timeout: STEP_MS });
  return page;
}

async function waitConnected(page) {
  await page.waitForFunction(() => window.demo.call && window.demo.call.state === 'connected',
                             null, { timeout: STEP_MS });
}

async function waitFrames(page) {
  // demo.stats() is async, so poll it from here (waitForFunction would take the promise as truthy).
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const stats = await page.evaluate(() => window.demo.stats());
    if (stats.framesDecoded > 0 || Date.now() > deadline) return stats;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium', headless: true,
    args: process.getuid && process.getuid() === 0 ? [...CHROMIUM_ARGS, '--no-sandbox'] : CHROMIUM_ARGS,
  });
  const result = { transport };
  try {
    const contextA = await browser.newContext({ permissions: ['camera', 'microphone'] });
    const contextB = await browser.newContext({ permissions: ['camera', 'microphone'] });
    const alice = await openDemo(contextA, 'alice', tokenA);
    const bobTab1 = await openDemo(contextB, 'bob', tokenB);
    const bobTab2 = await openDemo(contextB, 'bob', tokenB);

    await alice.fill('#watch-input', 'bob');
    await alice.click('#watch');
    await alice.waitForSelector('#online li[data-user="bob"][data-status="ONLINE"]', { timeout: STEP_MS });
    result.sawBobOnline = true;

    await alice.fill('#callee', 'bob');
    await alice.fill('#display-name', 'carol');          // a caller posing as someone else
    await alice.selectOption('#call-type', 'VIDEO');
    result.relayOnly = await alice.isChecked('#relay-only');
    await alice.click('#call');
    await bobTab1.waitForSelector('#ringing:not([hidden])', { timeout: STEP_MS });
    await bobTab2.waitForSelector('#ringing:not([hidden])', { timeout: STEP_MS });
    result.bothTabsRang = true;
    result.ringFrom = await bobTab1.textContent('#ring-from');
    result.ringName = (await bobTab1.isVisible('#ring-name'))
      ? (await bobTab1.textContent('#ring-name')).replace(/\s+/g, ' ').trim() : null;

    await bobTab2.click('#accept');
    await bobTab1.waitForSelector('#ringing', { state: 'hidden', timeout: STEP_MS });
    result.otherTabEnded = await bobTab1.textContent('#call-ended');

    await Promise.all([waitConnected(alice), waitConnected(bobTab2)]);
    const [aliceStats, bobStats] = await Promise.all([waitFrames(alice), waitFrames(bobTab2)]);
    result.alice = aliceStats;
    result.bob = bobStats;
    result.policy = await alice.evaluate(() => window.demo.pc.getConfiguration().iceTransportPolicy);
    await alice.screenshot({ path: path.join(outDir, `alice-${transport}.png`), fullPage: true });
    await bobTab2.screenshot({ path: path.join(outDir, `bob-${transport}.png`), fullPage: true });

    // The recovery the page runs on iceConnectionState 'failed': new credentials, ICE restart.
    const fetchesBefore = await alice.evaluate(() => window.demo.credentialFetches);
    const ufragBefore = await alice.evaluate(() => window.demo.pc.localDescription.sdp.match(/a=ice-ufrag:(\S+)/)[1]);
    await alice.evaluate(() => window.demo.recoverIce());
    await alice.waitForFunction((before) => {
      const pc = window.demo.pc;
      const ufrag = pc.currentRemoteDescription && pc.localDescription.sdp.match(/a=ice-ufrag:(\S+)/)[1];
      return ufrag && ufrag !== before && pc.signalingState === 'stable' &&
        ['connected', 'completed'].includes(pc.iceConnectionState);
    }, ufragBefore, { timeout: STEP_MS });
    result.restart = {
      fetches: (await alice.evaluate(() => window.demo.credentialFetches)) - fetchesBefore,
      restarts: await alice.evaluate(() => window.demo.restarts),
      after: await waitFrames(alice),
    };

    await alice.click('#hangup');
    await bobTab2.waitForSelector('#call-ended:not([hidden])', { timeout: STEP_MS });
    result.bobSawHangup = await bobTab2.textContent('#call-ended');
    result.aliceEnded = await alice.textContent('#call-ended');
    result.bobTab1Call = await bobTab1.evaluate(() => window.demo.call);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
