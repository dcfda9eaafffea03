// The appliance's call demo: the client contract (docs/api.md) driven by the libraries customers use,
// @stomp/stompjs and sockjs-client, and the browser's own WebRTC.
//
// Flow: log in (STOMP CONNECT with the `ide` token), watch users' status, call one of them;
// the callee's tabs all ring, one answers, the others get call/down.  After ACCEPT the caller
// offers, the callee answers, candidates follow, all over /app/rtc/signaling.  ICE servers come
// from /app/turn/get-turn-credentials; when ICE fails the page fetches new ones and the caller
// renegotiates with an ICE restart, as the contract's front-end pseudo-code says.
//
// `window.demo` exposes the state for people poking in the console and for the end-to-end test.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const demo = window.demo = {
    config: null, client: null, user: null, connected: false,
    call: null,            // {id, peer, type, role: 'caller'|'callee', state}
    pc: null, localStream: null, credentialWaiters: [], pendingCandidates: [],
    ended: null, events: [], restarts: 0,
  };

  function log(text) {
    demo.events.push(text);
    const li = document.createElement('li');
    li.textContent = `${new Date().toISOString().slice(11, 19)} ${text}`;
    $('events').prepend(li);
  }

  function setStatus(state, text) {
    $('status').dataset.state = state;
    $('status').textContent = text;
  }

  function show(id, visible) { $(id).hidden = !visible; }

  function param(name) { return new URLSearchParams(location.search).get(name); }

  // ---------------------------------------------------------------- configuration and login

  async function loadConfig() {
    const response = await fetch('config.json');
    demo.config = (await response.json()).data;
    show('dev-token', demo.config.devTokens);
    show('libraries-missing', typeof StompJs === 'undefined' || typeof SockJS === 'undefined');
    for (const [field, name] of [['user', 'user'], ['token', 'token'], ['callee', 'callee']]) {
      if (param(name)) $(field).value = param(name);
    }
    if (param('transport')) $('transport').value = param('transport');
    if (param('relay')) $('relay-only').checked = param('relay') === '1';
  }

  async function devToken() {
    const userId = $('user').value.trim();
    const response = await fetch('token', {
      method: 'POST', headers: {'content-type': 'application/json'},
      body: JSON.stringify({userId}),
    });
    const body = await response.json();
    if (body.code !== 200) { log(`token refused: ${body.msg}`); return; }
    $('token').value = body.data.token;
    log(`development token for ${userId}`);
  }

  function connect() {
    const user = $('user').value.trim();
    const token = $('token').value.trim();
    if (!user || !token) { log('user id and token are both needed'); return; }
    demo.user = user;
    const path = `${demo.config.prefix}/ws?userId=${encodeURIComponent(user)}`;
    const transport = $('transport').value;
    const options = {
      connectHeaders: {ide: token},
      reconnectDelay: 2000,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
      onConnect: onConnected,
      onStompError: (frame) => {
        setStatus('error', `refused: ${frame.headers.message}`);
        log(`STOMP ERROR: ${frame.headers.message}`);
      },
      onWebSocketClose: () => {
        if (demo.connected) log('connection closed; reconnecting');
        demo.connected = false;
        setButtons();
        if (demo.client && demo.client.active) setStatus('disconnected', 'reconnecting…');
      },
    };
    if (transport === 'websocket') {
      const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
      options.brokerURL = `${scheme}://${location.host}${path}`;
    } else {
      const transports = transport === 'sockjs-no-websocket'
        ? ['xhr-streaming', 'xhr-polling'] : ['websocket', 'xhr-streaming', 'xhr-polling'];
      options.webSocketFactory = () => new SockJS(`${location.origin}${path}`, null, {transports});
    }
    demo.transport = transport;
    demo.client = new StompJs.Client(options);
    demo.client.activate();
    setStatus('disconnected', 'connecting…');
  }

  async function disconnect() {
    if (demo.call) hangup();
    if (demo.client) await demo.client.deactivate();
    demo.client = null;
    demo.connected = false;
    setStatus('disconnected', 'not connected');
    setButtons();
  }

  const HANDLERS = {
    '/topic/user/status': onStatus,
    '/user/queue/errors': onError,
    '/user/queue/call/request': onCallRequest,
    '/user/queue/call/response': onCallResponse,
    '/user/queue/call/down': onCallDown,
    '/user/queue/call/hangup': (m) => onCallEnded(m, 'hung up by the other side'),
    '/user/queue/call/timeout': (m) => onCallEnded(m, 'no answer (timed out)'),
    '/user/queue/rtc/signaling': onSignaling,
    '/user/queue/turn/get-turn-credentials': onCredentials,
  };

  function onConnected() {
    demo.connected = true;
    setStatus('connected', `connected as ${demo.user} (${demo.transport})`);
    log(`connected as ${demo.user}`);
    for (const [destination, handler] of Object.entries(HANDLERS)) {
      demo.client.subscribe(destination, (message) => handler(JSON.parse(message.body)));
    }
    setButtons();
    watch();
  }

  function send(destination, body) {
    demo.client.publish({destination, body: JSON.stringify(body)});
  }

  function setButtons() {
    $('connect').disabled = demo.connected;
    $('disconnect').disabled = !demo.connected;
    $('watch').disabled = !demo.connected;
    $('call').disabled = !demo.connected || demo.call !== null;
  }

  // ---------------------------------------------------------------- presence

  function watch() {
    const users = $('watch-input').value.split(/[\s,]+/).filter(Boolean);
    if (users.length && demo.connected) send('/app/user/status', users);
  }

  function onStatus(list) {
    for (const {userId, status} of list) {
      let li = [...$('online').children].find((el) => el.dataset.user === userId);
      if (!li) {
        li = document.createElement('li');
        li.dataset.user = userId;
        $('online').append(li);
      }
      li.dataset.status = status;
      li.textContent = `${userId} ${status}`;
    }
  }

  function onError(error) {
    log(`error ${error.code}: ${error.message}`);
    const reasons = {1001: 'callee busy', 1002: 'callee offline', 1006: 'you are already in a call'};
    if (demo.call && demo.call.state === 'calling' && reasons[error.code]) {
      endCall(reasons[error.code]);
    }
  }

  // ---------------------------------------------------------------- credentials

  function fetchCredentials() {
    return new Promise((resolve, reject) => {
      demo.credentialWaiters.push(resolve);
      send('/app/turn/get-turn-credentials', {});
      setTimeout(() => reject(new Error('no TURN credentials within 10 s')), 10000);
    });
  }

  function onCredentials(answer) {
    demo.iceServers = answer.iceServers;
    demo.credentialFetches = (demo.credentialFetches || 0) + 1;
    const waiter = demo.credentialWaiters.shift();
    if (waiter) waiter(answer);
  }

  // ---------------------------------------------------------------- calls

  function newCallId() {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    return 'demo-' + [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
  }

  function placeCall() {
    const callee = $('callee').value.trim();
    if (!callee) { log('who do you want to call?'); return; }
    const type = $('call-type').value;
    demo.call = {id: newCallId(), peer: callee, type, role: 'caller', state: 'calling'};
    // callerUserName is free text: the callee's page shows it only beside our user id.
    const name = $('display-name').value.trim() || demo.user;
    send('/app/call/request', {callId: demo.call.id, type, callee,
                               callerUserName: name, calleeUserName: callee});
    showCall('calling…');
    log(`calling ${callee} (${type})`);
  }

  function onCallRequest(request) {
    if (demo.call) { log(`ignored a call from ${request.caller}: already in a call`); return; }
    demo.call = {id: request.callId, peer: request.caller, type: request.type || 'VIDEO',
                 role: 'callee', state: 'ringing'};
    // Who calls is `caller`, the user id the appliance stamps from the caller's token;
    // callerUserName is whatever the caller typed, so it is only shown beside it, marked.
    $('ring-from').textContent = request.caller;
    const name = typeof request.callerUserName === 'string' ? request.callerUserName.trim() : '';
    $('ring-name-text').textContent = name;
    show('ring-name', name !== '' && name !== request.caller);
    $('ring-type').textContent = demo.call.type.toLowerCase();
    show('ringing', true);
    show('call-ended', false);
    setButtons();
    log(`ringing: ${request.caller} calls (${demo.call.type})`);
  }

  function answer(accept) {
    const call = demo.call;
    if (!call || call.state !== 'ringing') return;
    send('/app/call/response', {callId: call.id, type: accept ? 'ACCEPT' : 'REJECT'});
    show('ringing', false);
    if (!accept) { endCall('you rejected the call'); return; }
    call.state = 'connecting';
    showCall('connecting…');
    startPeer(false).catch((err) => failCall(err));
  }

  function onCallResponse(response) {
    const call = demo.call;
    if (!call || call.id !== response.callId || call.role !== 'caller') return;
    if (response.type === 'REJECT') { endCall(`${call.peer} rejected the call`); return; }
    call.state = 'connecting';
    showCall('connecting…');
    log(`${call.peer} answered`);
    startPeer(true).catch((err) => failCall(err));
  }

  function onCallDown(message) {
    const call = demo.call;
    if (!call || call.id !== message.callId) return;
    show('ringing', false);
    endCall('answered on another device');
  }

  function onCallEnded(message, why) {
    if (!demo.call || demo.call.id !== message.callId) return;
    endCall(why);
  }

  function hangup() {
    if (!demo.call) return;
    send('/app/call/hangup', {callId: demo.call.id});
    endCall('you hung up');
  }

  function failCall(err) {
    log(`call failed: ${err.message || err}`);
    hangup();
  }

  function showCall(state) {
    $('peer-name').textContent = demo.call.peer;
    $('call-state').textContent = state;
    show('in-call', true);
    show('call-ended', false);
    setButtons();
  }

  function endCall(why) {
    if (demo.call) log(`call ${demo.call.id} ended: ${why}`);
    demo.call = null;
    demo.ended = why;
    if (demo.pc) demo.pc.close();
    demo.pc = null;
    demo.pendingCandidates = [];
    if (demo.localStream) demo.localStream.getTracks().forEach((t) => t.stop());
    demo.localStream = null;
    $('local-video').srcObject = null;
    $('remote-video').srcObject = null;
    show('ringing', false);
    show('in-call', false);
    $('call-ended').textContent = `Call ended: ${why}`;
    show('call-ended', true);
    setButtons();
  }

  // ---------------------------------------------------------------- WebRTC

  function signal(type, payload) {
    send('/app/rtc/signaling', {callId: demo.call.id, type, payload});
  }

  function rtcConfiguration() {
    return {iceServers: demo.iceServers,
            iceTransportPolicy: $('relay-only').checked ? 'relay' : 'all'};
  }

  async function startPeer(initiator) {
    const call = demo.call;
    await fetchCredentials();
    const stream = await navigator.mediaDevices.getUserMedia(
      {audio: true, video: call.type === 'VIDEO'});
    if (demo.call !== call) { stream.getTracks().forEach((t) => t.stop()); return; }
    demo.localStream = stream;
    $('local-video').srcObject = stream;
    const pc = demo.pc = new RTCPeerConnection(rtcConfiguration());
    stream.getTracks().forEach((track) => pc.addTrack(track, stream));
    pc.ontrack = (event) => { $('remote-video').srcObject = event.streams[0]; };
    pc.onicecandidate = (event) => {
      if (event.candidate) {
        const c = event.candidate;
        signal('ICE_CANDIDATE', {candidate: c.candidate, sdpMid: c.sdpMid,
                                 sdpMLineIndex: c.sdpMLineIndex});
      }
    };
    pc.oniceconnectionstatechange = () => onIceState(pc);
    log(`peer connection (${rtcConfiguration().iceTransportPolicy}) with ` +
        `${demo.iceServers.length} ICE server(s)`);
    if (initiator) await offer(false);
  }

  async function offer(iceRestart) {
    const pc = demo.pc;
    const description = await pc.createOffer({iceRestart});
    await pc.setLocalDescription(description);
    signal('OFFER', description.sdp);
  }

  async function onIceState(pc) {
    if (pc !== demo.pc || !demo.call) return;
    const state = pc.iceConnectionState;
    $('ice-state').textContent = state;
    log(`ICE ${state}`);
    if (state === 'connected' || state === 'completed') {
      demo.call.state = 'connected';
      $('call-state').textContent = 'connected';
      $('path').textContent = await selectedPath();
    } else if (state === 'failed') {
      await recoverIce();
    }
  }

  // The contract's recovery: fetch new credentials and renegotiate (the caller restarts ICE;
  // the callee answers the restart offer like any other).
  async function recoverIce() {
    if (!demo.pc || !demo.call) return;
    demo.restarts += 1;
    log('ICE failed: fetching new TURN credentials and restarting ICE');
    await fetchCredentials();
    demo.pc.setConfiguration(rtcConfiguration());
    if (demo.call.role === 'caller') await offer(true);
  }
  demo.recoverIce = recoverIce;

  async function onSignaling(message) {
    const call = demo.call;
    if (!call || message.callId !== call.id) return;
    try {
      if (message.type === 'OFFER') {
        while (!demo.pc) await new Promise((r) => setTimeout(r, 50));   // still getting media
        await demo.pc.setRemoteDescription({type: 'offer', sdp: message.payload});
        await flushCandidates();
        const description = await demo.pc.createAnswer();
        await demo.pc.setLocalDescription(description);
        signal('ANSWER', description.sdp);
      } else if (message.type === 'ANSWER') {
        await demo.pc.setRemoteDescription({type: 'answer', sdp: message.payload});
        await flushCandidates();
      } else if (message.type === 'ICE_CANDIDATE') {
        demo.pendingCandidates.push(message.payload);
        if (demo.pc && demo.pc.remoteDescription) await flushCandidates();
      }
    } catch (err) {
      log(`signaling ${message.type} failed: ${err.message}`);
    }
  }

  async function flushCandidates() {
    const candidates = demo.pendingCandidates.splice(0);
    for (const candidate of candidates) await demo.pc.addIceCandidate(candidate);
  }

  async function selectedPath() {
    const info = await demo.stats();
    return info.localType ? `${info.localType} ↔ ${info.remoteType}` : '?';
  }

  // For the console and the end-to-end test: what the connection is really doing.
  demo.stats = async function () {
    const result = {iceConnectionState: demo.pc ? demo.pc.iceConnectionState : null,
                    framesDecoded: 0, localType: null, remoteType: null};
    if (!demo.pc) return result;
    const report = await demo.pc.getStats();
    let pairId = null;
    report.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId; });
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') result.framesDecoded += s.framesDecoded || 0;
      if (!pairId && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pairId = s.id;
    });
    const pair = pairId && report.get(pairId);
    if (pair) {
      result.localType = report.get(pair.localCandidateId).candidateType;
      result.remoteType = report.get(pair.remoteCandidateId).candidateType;
    }
    return result;
  };

  // ---------------------------------------------------------------- wiring

  $('dev-token').onclick = devToken;
  $('connect').onclick = connect;
  $('disconnect').onclick = disconnect;
  $('watch').onclick = watch;
  $('call').onclick = placeCall;
  $('accept').onclick = () => answer(true);
  $('reject').onclick = () => answer(false);
  $('hangup').onclick = hangup;
  loadConfig().then(() => log('ready'), (err) => log(`configuration failed: ${err.message}`));
})();
