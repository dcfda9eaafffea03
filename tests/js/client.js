// A scripted session of the JavaScript clients our customers ship, against the appliance.
//
//   node client.js <mode> <http base url> <prefix>
//
// mode: stompjs-ws                   @stomp/stompjs v7 over a native WebSocket
//       stompjs-sockjs-<transport>   @stomp/stompjs v7 over sockjs-client, one SockJS transport
//       legacy-sockjs-<transport>    stompjs 2.3 (Stomp.over) over sockjs-client
// transport: websocket | xhr-streaming | xhr-polling
//
// Alice connects, subscribes, asks about Bob and 张三, sees Bob come ONLINE and go OFFLINE,
// gets a 403 on /user/queue/errors for a SEND outside /app, and disconnects.  Prints one
// JSON line per step; exits 0 only if every step saw exactly what docs/api.md promises.
'use strict';

const WebSocket = require('ws');
const SockJS = require('sockjs-client');
const { Client } = require('@stomp/stompjs');
const LegacyStomp = require('stompjs/lib/stomp.js').Stomp;
// What stompjs 2.3 does for itself in a browser (window.setInterval) and in its own
// stomp-node.js wrapper; requiring lib/stomp.js directly leaves these to the host.
LegacyStomp.setInterval = (interval, f) => setInterval(f, interval);
LegacyStomp.clearInterval = (id) => clearInterval(id);

const [mode, base, prefix] = process.argv.slice(2);
const TOKENS = { alice: 'tok-alice', bob: 'tok-bob' };
const STEP_TIMEOUT_MS = 8000;

function log(step, detail) {
  console.log(JSON.stringify({ step, ...detail }));
}

function fail(message) {
  log('failed', { message });
  process.exit(1);
}

setTimeout(() => fail('overall timeout'), 60000).unref();

function socketFactory(user) {
  const ws = `${base.replace(/^http/, 'ws')}${prefix}/ws?userId=${encodeURIComponent(user)}`;
  const sockjsUrl = `${base}${prefix}/ws?userId=${encodeURIComponent(user)}`;
  if (mode === 'stompjs-ws') {
    return () => new WebSocket(ws, ['v12.stomp', 'v11.stomp', 'v10.stomp']);
  }
  const transport = mode.replace(/^(stompjs|legacy)-sockjs-/, '');
  return () => new SockJS(sockjsUrl, null, { transports: [transport] });
}

// One connected user, with a queue of received messages per destination.
function connect(user) {
  return new Promise((resolve, reject) => {
    const inbox = [];
    const waiters = [];
    const deliver = (destination, body) => {
      const entry = { destination, body: JSON.parse(body) };
      const i = waiters.findIndex((w) => w.destination === destination);
      if (i >= 0) waiters.splice(i, 1)[0].resolve(entry.body);
      else inbox.push(entry);
    };
    const next = (destination) => new Promise((res, rej) => {
      const i = inbox.findIndex((e) => e.destination === destination);
      if (i >= 0) return res(inbox.splice(i, 1)[0].body);
      const timer = setTimeout(() => rej(new Error(`nothing on ${destination} for ${user}`)), STEP_TIMEOUT_MS);
      waiters.push({ destination, resolve: (b) => { clearTimeout(timer); res(b); } });
    });
    const headers = { ide: TOKENS[user] };
    if (mode.startsWith('legacy-')) {
      const client = LegacyStomp.over(socketFactory(user)());
      client.debug = null;
      client.heartbeat.outgoing = 10000;
      client.heartbeat.incoming = 10000;
      client.connect(headers, () => {
        for (const d of ['/topic/user/status', '/user/queue/errors']) {
          client.subscribe(d, (m) => deliver(d, m.body));
        }
        resolve({
          send: (d, body) => client.send(d, { 'content-type': 'application/json' }, JSON.stringify(body)),
          next,
          close: () => new Promise((res) => client.disconnect(res)),
        });
      }, (err) => reject(new Error(`connect failed: ${err && (err.headers ? err.headers.message : err)}`)));
      return;
    }
    const client = new Client({
      webSocketFactory: socketFactory(user),
      connectHeaders: headers,
      reconnectDelay: 0,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
    });
    client.onConnect = () => {
      for (const d of ['/topic/user/status', '/user/queue/errors']) {
        client.subscribe(d, (m) => deliver(d, m.body));
      }
      resolve({
        send: (d, body) => client.publish({ destination: d, body: JSON.stringify(body),
          headers: { 'content-type': 'application/json' } }),
        next,
        close: () => client.deactivate(),
      });
    };
    client.onStompError = (frame) => reject(new Error(`ERROR frame: ${frame.headers.message}`));
    client.onWebSocketError = () => reject(new Error('websocket error'));
    client.activate();
  });
}

function expectEqual(step, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`${step}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  log(step, { got });
}

(async () => {
  const alice = await connect('alice');
  log('connected', { user: 'alice', mode });
  alice.send('/app/user/status', ['bob', '张三']);
  expectEqual('status answer', await alice.next('/topic/user/status'),
    [{ userId: 'bob', status: 'OFFLINE' }, { userId: '张三', status: 'OFFLINE' }]);
  const bob = await connect('bob');
  expectEqual('online push', await alice.next('/topic/user/status'), [{ userId: 'bob', status: 'ONLINE' }]);
  await bob.close();
  expectEqual('offline push', await alice.next('/topic/user/status'), [{ userId: 'bob', status: 'OFFLINE' }]);
  alice.send('/topic/user/status', []);
  const error = await alice.next('/user/queue/errors');
  expectEqual('error code', error.code, 403);
  alice.send('/app/user/status', ['alice']);
  expectEqual('still served', await alice.next('/topic/user/status'), [{ userId: 'alice', status: 'ONLINE' }]);
  await alice.close();
  log('ok', { mode });
  process.exit(0);
})().catch((err) => fail(err.message));
