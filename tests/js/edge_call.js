// A relay-only call in headless Chromium through the edge listener alone: both pages load
// the demo from https://HOST:EDGE, signal over WSS on that port, and relay over TURN over
// TLS on that same port (the only TURN URL the credentials endpoint hands out).  Reports
// each side's selected candidate pair, with the local candidate's relay protocol and the
// TURN URL it came from, and the iceServers each page was given.
//
// With RECORDER_PORT, a last peer connection is pointed at turns:127.0.0.1:RECORDER_PORT,
// where the test keeps the ClientHello Chromium's TURN over TLS sends (its ALPN offer).
//
// usage: node edge_call.js BASE_URL OUT_DIR TOKEN_A TOKEN_B [RECORDER_PORT]
// Prints one JSON line; the pytest side (tests/interop/test_edge.py) asserts on it.
'use strict';

const path = require('path');
const { chromium } = require('playwright-core');

const [base, outDir, tokenA, tokenB, recorderPort] = process.argv.slice(2);
const STEP_MS = 30000;

const CHROMIUM_ARGS = [
  // The edge serves a self-signed development certificate, for the page and for TURN over
  // TLS (WebRTC's TLS sockets are the network service's: the browser-wide switch covers them).
  '--ignore-certificate-errors',
  ...require('./chromium_args').CHROMIUM_ARGS,
];

async function openDemo(browser, user, token) {
  const context = await browser.newContext({ permissions: ['camera', 'microphone'], ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', (msg) => { if (msg.type() === 'error') console.error(`[${user}] ${msg.text()}`); });
  await page.goto(`${base}/imserver/demo/?relay=1`);
  await page.fill('#user', user);
  await page.fill('#token', token);
  await page.selectOption('#transport', 'websocket');
  await page.click('#connect');
  await page.waitForSelector('#status[data-state="connected"]', { timeout: STEP_MS });
  return page;
}

// The selected pair, and where the local relayed candidate came from (url, relayProtocol).
async function selectedPair(page) {
  return page.evaluate(async () => {
    const pc = window.demo.pc;
    const report = await pc.getStats();
    let pairId = null;
    let framesDecoded = 0;
    report.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
      if (s.type === 'inbound-rtp' && s.kind === 'video') framesDecoded += s.framesDecoded || 0;
    });
    const pair = pairId && report.get(pairId);
    const local = pair ? report.get(pair.localCandidateId) : {};
    const remote = pair ? report.get(pair.remoteCandidateId) : {};
    return {
      iceConnectionState: pc.iceConnectionState,
      framesDecoded,
      localType: local.candidateType || null,
      remoteType: remote.candidateType || null,
      relayProtocol: local.relayProtocol || null,
      url: local.url || null,
      iceServers: window.demo.iceServers.map((s) => s.urls),
      policy: pc.getConfiguration().iceTransportPolicy,
    };
  });
}

async function waitMedia(page) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const stats = await selectedPair(page);
    if ((stats.framesDecoded > 0 && stats.localType) || Date.now() > deadline) return stats;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

// Gather relay candidates from turns:127.0.0.1:PORT (the test's recorder, which only keeps
// the ClientHello): Chromium's TURN over TLS connects there as it did to the edge.
async function probeTurnTls(page, port) {
  return page.evaluate(async (port) => {
    const pc = new RTCPeerConnection({
      iceServers: [{ urls: `turns:127.0.0.1:${port}?transport=tcp`, username: 'probe', credential: 'probe' }],
      iceTransportPolicy: 'relay',
    });
    pc.createDataChannel('probe');
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') resolve();
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') resolve(); };
      setTimeout(resolve, 10000);
    });
    pc.close();
    return true;
  }, port);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium', headless: true,
    args: process.getuid && process.getuid() === 0 ? [...CHROMIUM_ARGS, '--no-sandbox'] : CHROMIUM_ARGS,
  });
  const result = { browserVersion: browser.version() };
  try {
    const alice = await openDemo(browser, 'alice', tokenA);
    const bob = await openDemo(browser, 'bob', tokenB);
    await alice.fill('#callee', 'bob');
    await alice.selectOption('#call-type', 'VIDEO');
    result.relayOnly = await alice.isChecked('#relay-only');
    await alice.click('#call');
    await bob.waitForSelector('#ringing:not([hidden])', { timeout: STEP_MS });
    await bob.click('#accept');
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => window.demo.call && window.demo.call.state === 'connected',
                                 null, { timeout: STEP_MS });
    }
    [result.alice, result.bob] = await Promise.all([waitMedia(alice), waitMedia(bob)]);
    await alice.screenshot({ path: path.join(outDir, 'alice-edge.png'), fullPage: true });
    await bob.screenshot({ path: path.join(outDir, 'bob-edge.png'), fullPage: true });
    await alice.click('#hangup');
    await bob.waitForSelector('#call-ended:not([hidden])', { timeout: STEP_MS });
    result.bobSawHangup = await bob.textContent('#call-ended');
    if (recorderPort) result.probed = await probeTurnTls(alice, Number(recorderPort));
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
