// The switches every headless Chromium of the tests runs with (browser_call.js, edge_call.js).
'use strict';

const CHROMIUM_ARGS = [
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  // No traffic of its own: the test machine has no internet, and nothing should wait on it.
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-default-apps',
  '--disable-domain-reliability',
  '--disable-sync',
  '--no-default-browser-check',
  '--no-first-run',
  '--metrics-recording-only',
  '--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider',
  // Two contexts share one renderer budget on a 2-core machine: keep timers honest.
  '--disable-renderer-backgrounding',
  '--disable-background-timer-throttling',
  '--disable-backgrounding-occluded-windows',
];

module.exports = { CHROMIUM_ARGS };
