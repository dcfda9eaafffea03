// A call between the web client stacks: @stomp/stompjs v7 over native WebSockets.
//
//   node calls.js <http base url> <prefix> [<phone's http base url>]
//
// The third argument puts the phone on another appliance node (one Redis behind both).
// Alice calls Bob, who is logged in on a phone and a laptop: both ring, the phone answers,
// the laptop is told call/down, offer/answer/candidate flow between Alice and the phone only,
// Alice hangs up and only the phone hears it.  Exits 0 only if every message is as docs/api.md says.
'use strict';

const WebSocket = require('ws');
const { Client } = require('@stomp/stompjs');

const [base, prefix, phoneBase = base] = process.argv.slice(2);
const TOKENS = { alice: 'tok-alice', bob: 'tok-bob' };
const DESTINATIONS = ['/user/queue/call/request', '/user/queue/call/response', '/user/queue/call/down',
  '/user/queue/call/hangup', '/user/queue/rtc/signaling', '/user/queue/errors'];

function fail(message) {
  console.log(JSON.stringify({ step: 'failed', message }));
  process.exit(1);
}
setTimeout(() => fail('overall timeout'), 30000).unref();

function device(user, at = base) {
  return new Promise((resolve, reject) => {
    const inbox = [];
    const waiters = [];
    const client = new Client({
      webSocketFactory: () => new WebSocket(`${at.replace(/^http/, 'ws')}${prefix}/ws?userId=${user}`,
        ['v12.stomp']),
      connectHeaders: { ide: TOKENS[user] },
      reconnectDelay: 0,
    });
    client.onConnect = () => {
      for (const d of DESTINATIONS) {
        client.subscribe(d, (m) => {
          const entry = [d, JSON.parse(m.body)];
          if (waiters.length) waiters.shift()(entry); else inbox.push(entry);
        });
      }
      // A round trip so every SUBSCRIBE is in place before the call starts.
      client.subscribe('/topic/user/status', () => resolve({
        send: (d, body) => client.publish({ destination: d, body: JSON.stringify(body) }),
        next: () => new Promise((res, rej) => {
          if (inbox.length) return res(inbox.shift());
          const t = setTimeout(() => rej(new Error(`${user}: nothing arrived`)), 5000);
          waiters.push((e) => { clearTimeout(t); res(e); });
        }),
        quiet: () => new Promise((res, rej) => setTimeout(
          () => (inbox.length ? rej(new Error(`${user} got ${JSON.stringify(inbox[0])}`)) : res()), 300)),
        close: () => client.deactivate(),
      }));
      client.publish({ destination: '/app/user/status', body: JSON.stringify([user]) });
    };
    client.onStompError = (f) => reject(new Error(f.headers.message));
    client.activate();
  });
}

function expect(step, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`${step}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  console.log(JSON.stringify({ step }));
}

(async () => {
  const alice = await device('alice');
  const phone = await device('bob', phoneBase);
  const laptop = await device('bob');
  const request = { callId: 'js-call', type: 'AUDIO', callee: 'bob', callerUserName: '爱丽丝',
    calleeUserName: 'Bob' };
  alice.send('/app/call/request', request);
  const ringing = ['/user/queue/call/request', { ...request, caller: 'alice' }];
  expect('phone rings', await phone.next(), ringing);
  expect('laptop rings', await laptop.next(), ringing);
  phone.send('/app/call/response', { callId: 'js-call', type: 'ACCEPT' });
  expect('caller told', await alice.next(), ['/user/queue/call/response', { callId: 'js-call', type: 'ACCEPT' }]);
  expect('laptop stops ringing', await laptop.next(), ['/user/queue/call/down', { callId: 'js-call', type: 'ACCEPT' }]);
  const offer = { callId: 'js-call', type: 'OFFER', payload: 'v=0\r\n' };
  alice.send('/app/rtc/signaling', offer);
  expect('offer to phone', await phone.next(), ['/user/queue/rtc/signaling', { ...offer, from: 'alice' }]);
  const answer = { callId: 'js-call', type: 'ANSWER', payload: 'v=0\r\n' };
  phone.send('/app/rtc/signaling', answer);
  expect('answer to caller', await alice.next(), ['/user/queue/rtc/signaling', { ...answer, from: 'bob' }]);
  alice.send('/app/call/hangup', { callId: 'js-call' });
  expect('hangup to phone', await phone.next(), ['/user/queue/call/hangup', { callId: 'js-call' }]);
  await laptop.quiet();
  await Promise.all([alice.close(), phone.close(), laptop.close()]);
  console.log(JSON.stringify({ step: 'ok' }));
  process.exit(0);
})().catch((err) => fail(err.message));
