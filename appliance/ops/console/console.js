// The operator page (served by appliance/ops/console/site.py at /admin/ on the admin listener).
//
// Every 2 s it reads /metrics (the Prometheus text, parsed here) and draws the last 10 minutes:
// relayed bits and packets per second each way, allocations, sessions and online users, calls
// by outcome, auth failures and errors by kind.  Every other poll (and after each action) it
// reads the tables: allocations, signaling sessions, calls, revocations, the secret ring, with
// buttons that revoke or disconnect a user and rotate or prune the secrets.  Every request sends
// the admin token the operator typed once (kept in this tab's sessionStorage); an appliance
// without admin.token (loopback only) answers without one, and the page then asks for none.
//
// User ids and addresses are client text: they reach the page only through textContent and
// data attributes, never as markup.  What the page keeps is bounded: MAX_SAMPLES per series,
// MAX_SERIES series per chart, the tables as the API caps them.
'use strict';

(() => {
  const POLL_MS = 2000;
  const KEEP_S = 600;
  const MAX_SAMPLES = Math.ceil((KEEP_S * 1000) / POLL_MS) + 1;
  const TABLES_EVERY = 2; // polls; the tables ask every node, so not as often as /metrics
  const REQUEST_TIMEOUT_MS = 8000;
  const MAX_SERIES = 12; // label sets are bounded by the appliance; this bounds the page as well
  const MAX_METRICS_CHARS = 4 * 1024 * 1024;
  const CHART_HEIGHT = 170;
  const TOKEN_KEY = 'appliance-admin-token';
  const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b',
                  '#e377c2', '#7f7f7f', '#bcbd22', '#17becf', '#393b79', '#637939'];

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ the admin API

  class Unauthorized extends Error {
    constructor(sentToken) {
      super(sentToken ? 'wrong token' : 'token needed');
      this.sentToken = sentToken;
    }
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  let serverOffsetMs = 0; // the appliance's clock minus ours, from its Date headers

  async function api(method, path, body) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = {
      method, headers, cache: 'no-store', credentials: 'omit',
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) { // unreachable, refused, timed out: the appliance's side, not the page's
      throw new ApiError(0, `cannot reach the admin listener (${err.message})`);
    }
    const date = Date.parse(response.headers.get('Date') || '');
    if (!Number.isNaN(date)) serverOffsetMs = date - Date.now();
    if (response.status === 401) throw new Unauthorized(Boolean(token));
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const answer = await response.json();
        if (answer && typeof answer.error === 'string') message = answer.error;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(response.status, message);
    }
    return response;
  }

  const serverNow = () => (Date.now() + serverOffsetMs) / 1000;

  // ------------------------------------------------------------ Prometheus text

  function unescapeLabel(text) {
    return text.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
  }

  // name -> [{labels, value}] of the exposition format's sample lines.
  function parseMetrics(text) {
    const metrics = new Map();
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const line of text.split('\n')) {
      if (line === '' || line[0] === '#') continue;
      const m = sample.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const l of m[2].matchAll(label)) labels[l[1]] = unescapeLabel(l[2]);
      const value = Number(m[3].replace(/^\+?Inf$/, 'Infinity'));
      if (!metrics.has(m[1])) metrics.set(m[1], []);
      metrics.get(m[1]).push({ labels, value });
    }
    return metrics;
  }

  // The sum of a family's samples, or null when the appliance does not export it (no relay...).
  function total(metrics, name) {
    const samples = metrics.get(name);
    return samples ? samples.reduce((sum, s) => sum + s.value, 0) : null;
  }

  function byLabel(metrics, name, label, prefix = '') {
    const values = {};
    for (const s of metrics.get(name) || []) {
      const key = prefix + (s.labels[label] ?? '');
      values[key] = (values[key] || 0) + s.value;
    }
    return values;
  }

  function present(values) {
    return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== null));
  }

  // ------------------------------------------------------------ what is drawn

  // kind 'gauge': the value as read; 'rate': the counter's increase per second (times `per`)
  // between two polls.  `series` picks {series name: value} from the parsed text.
  const CHARTS = [
    { id: 'relay-bits', title: 'Relayed bits per second', unit: 'b/s', kind: 'gauge',
      series: (m) => byLabel(m, 'appliance_relay_bits_per_second', 'direction') },
    { id: 'relay-packets', title: 'Relayed packets per second', unit: 'pkt/s', kind: 'gauge',
      series: (m) => byLabel(m, 'appliance_relay_packets_per_second', 'direction') },
    { id: 'allocations', title: 'Allocations', unit: '', kind: 'gauge',
      series: (m) => present({
        all: total(m, 'appliance_relay_allocations'),
        ...byLabel(m, 'appliance_relay_allocations_by_transport', 'transport'),
      }) },
    { id: 'signaling', title: 'Sessions, online users, calls', unit: '', kind: 'gauge',
      series: (m) => present({
        sessions: total(m, 'appliance_signaling_sessions'),
        'online users': total(m, 'appliance_signaling_online_users'),
        'calls now': total(m, 'appliance_calls_active'),
      }) },
    { id: 'calls', title: 'Calls by outcome per minute', unit: '/min', kind: 'rate', per: 60,
      series: (m) => byLabel(m, 'appliance_calls_total', 'outcome') },
    { id: 'auth-failures', title: 'Auth failures per second', unit: '/s', kind: 'rate', per: 1,
      series: (m) => ({
        ...byLabel(m, 'appliance_relay_auth_failures_total', 'reason', 'relay '),
        ...byLabel(m, 'appliance_signaling_auth_failures_total', 'reason', 'signaling '),
      }) },
    { id: 'errors', title: 'Errors per second by kind', unit: '/s', kind: 'rate', per: 1,
      series: (m) => present({
        ...byLabel(m, 'appliance_relay_errors_total', 'code', 'relay '),
        ...byLabel(m, 'appliance_signaling_errors_total', 'code', 'signaling '),
        ...byLabel(m, 'appliance_relay_internal_errors_by_path_total', 'path', 'bug in '),
        'malformed input': total(m, 'appliance_relay_malformed_packets_total'),
      }) },
  ];

  // The last MAX_SAMPLES polls: one time column, and per chart a column per series.
  class History {
    constructor() {
      this.times = [];
      this.charts = new Map(); // chart id -> {keys: [...], columns: Map(key -> [...])}
      this.previous = null; // {time, raw: Map(chart id -> {key: counter value})} for rates
    }

    add(time, metrics) {
      this.times.push(time);
      const raw = new Map();
      const latest = new Map();
      for (const chart of CHARTS) {
        const values = chart.series(metrics);
        raw.set(chart.id, values);
        const shown = chart.kind === 'rate' ? this.rates(chart, values, time) : values;
        latest.set(chart.id, shown);
        this.append(chart.id, shown);
      }
      this.previous = { time, raw };
      if (this.times.length > MAX_SAMPLES) {
        this.times.shift();
        for (const h of this.charts.values()) for (const column of h.columns.values()) column.shift();
      }
      return latest;
    }

    rates(chart, values, time) {
      const before = this.previous && this.previous.raw.get(chart.id);
      const span = this.previous ? time - this.previous.time : 0;
      const rates = {};
      for (const [key, value] of Object.entries(values)) {
        // A counter that fell was restarted (a relay worker replaced): no rate for that poll.
        rates[key] = before && key in before && span > 0 && value >= before[key]
          ? ((value - before[key]) / span) * chart.per : null;
      }
      return rates;
    }

    append(id, values) {
      if (!this.charts.has(id)) this.charts.set(id, { keys: [], columns: new Map() });
      const h = this.charts.get(id);
      for (const key of Object.keys(values)) {
        if (h.columns.has(key) || h.keys.length >= MAX_SERIES) continue;
        h.keys.push(key);
        h.columns.set(key, new Array(this.times.length - 1).fill(null));
      }
      for (const key of h.keys) h.columns.get(key).push(key in values ? values[key] : null);
    }

    data(id) {
      const h = this.charts.get(id);
      return { keys: h.keys, data: [this.times.slice(), ...h.keys.map((k) => h.columns.get(k).slice())] };
    }
  }

  // ------------------------------------------------------------ formatting

  function si(value, unit = '') {
    if (value === null || value === undefined || !Number.isFinite(value)) return '–';
    const abs = Math.abs(value);
    for (const [factor, prefix] of [[1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) {
      if (abs >= factor) return `${(value / factor).toFixed(abs >= factor * 100 ? 0 : 1)} ${prefix}${unit}`;
    }
    const digits = Number.isInteger(value) || abs >= 100 ? 0 : abs >= 1 ? 1 : 2;
    return `${value.toFixed(digits)}${unit ? ` ${unit}` : ''}`;
  }

  function bytes(value) {
    return si(value, 'B');
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '–';
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return `${s} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  function clock(epochSeconds) {
    if (epochSeconds === null || epochSeconds === undefined) return '–';
    const d = new Date(epochSeconds * 1000);
    const sameDay = Math.abs(epochSeconds - serverNow()) < 43200;
    return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // ------------------------------------------------------------ charts

  const plots = new Map(); // chart id -> {plot, keys}
  const figures = new Map(); // chart id -> {figure, now, plotArea}

  function figureFor(chart) {
    if (figures.has(chart.id)) return figures.get(chart.id);
    const figure = document.createElement('figure');
    figure.className = 'chart';
    figure.id = `chart-${chart.id}`;
    figure.dataset.last = '{}';
    const caption = document.createElement('figcaption');
    const title = document.createElement('span');
    title.className = 'chart-title';
    title.textContent = chart.title;
    const now = document.createElement('span');
    now.className = 'chart-now';
    caption.append(title, now);
    const plotArea = document.createElement('div');
    plotArea.className = 'chart-plot';
    figure.append(caption, plotArea);
    $('charts').append(figure);
    const entry = { figure, now, plotArea };
    figures.set(chart.id, entry);
    return entry;
  }

  const timeOfDay = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });

  function plotOptions(chart, keys, width) {
    const format = (u, v) => si(v, chart.unit);
    return {
      width, height: CHART_HEIGHT,
      series: [
        { label: 'time', value: (u, t) => (t === null ? '–' : timeOfDay(t)) },
        ...keys.map((key, i) => ({ label: key, stroke: COLORS[i % COLORS.length], width: 1.5, value: format })),
      ],
      scales: {
        // At least a minute wide, from the first samples on.
        x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
      },
      axes: [
        { space: 80, values: (u, splits) => splits.map(timeOfDay) }, // one line, no date
        { size: 70, values: (u, splits) => splits.map((v) => si(v, chart.unit)) },
      ],
      legend: { live: true },
    };
  }

  function draw(history, latest) {
    for (const chart of CHARTS) {
      const { figure, now, plotArea } = figureFor(chart);
      const values = latest.get(chart.id);
      figure.dataset.last = JSON.stringify(values);
      now.textContent = Object.entries(values).slice(0, MAX_SERIES)
        .map(([k, v]) => `${k} ${si(v, chart.unit)}`).join(' · ');
      if (typeof uPlot === 'undefined') continue; // the library is missing: figures only
      const { keys, data } = history.data(chart.id);
      if (data[0].length < 2) continue; // uPlot spans a day around a lone point
      let entry = plots.get(chart.id);
      if (entry && entry.keys.join('\n') !== keys.join('\n')) { // a new label value: new series
        entry.plot.destroy();
        entry = null;
      }
      if (!entry) {
        const width = Math.max(240, plotArea.clientWidth);
        entry = { plot: new uPlot(plotOptions(chart, keys, width), data, plotArea), keys: keys.slice() };
        plots.set(chart.id, entry);
      } else {
        entry.plot.setData(data);
      }
    }
  }

  function resizeCharts() {
    for (const [id, entry] of plots) {
      const width = Math.max(240, figures.get(id).plotArea.clientWidth);
      entry.plot.setSize({ width, height: CHART_HEIGHT });
    }
  }

  function showTiles(metrics) {
    const bits = byLabel(metrics, 'appliance_relay_bits_per_second', 'direction');
    const tiles = {
      'now-to-peer': [bits.to_peer ?? null, 'b/s'],
      'now-to-client': [bits.to_client ?? null, 'b/s'],
      'now-allocations': [total(metrics, 'appliance_relay_allocations'), ''],
      'now-sessions': [total(metrics, 'appliance_signaling_sessions'), ''],
      'now-online': [total(metrics, 'appliance_signaling_online_users'), ''],
      'now-calls': [total(metrics, 'appliance_calls_active'), ''],
    };
    for (const [id, [value, unit]] of Object.entries(tiles)) {
      $(id).textContent = si(value, unit);
      $(id).dataset.value = value === null ? '' : String(value);
    }
  }

  // ------------------------------------------------------------ tables

  function button(text, className, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = className;
    b.textContent = text;
    b.addEventListener('click', onClick);
    return b;
  }

  // columns: [[title, row -> text]]; actions: row -> [buttons] or null.
  function fillTable(id, columns, rows, actions) {
    const table = $(id);
    const head = document.createElement('tr');
    for (const [title] of columns) {
      const th = document.createElement('th');
      th.textContent = title;
      head.append(th);
    }
    if (actions) head.append(document.createElement('th'));
    table.tHead.replaceChildren(head);
    const body = rows.map((row) => {
      const tr = document.createElement('tr');
      if (typeof row.user === 'string') tr.dataset.user = row.user;
      for (const [, cell] of columns) {
        const td = document.createElement('td');
        td.textContent = cell(row);
        tr.append(td);
      }
      if (actions) {
        const td = document.createElement('td');
        td.className = 'actions';
        td.append(...actions(row));
        tr.append(td);
      }
      return tr;
    });
    if (body.length === 0) {
      const tr = document.createElement('tr');
      const td = document.createElement('td');
      td.colSpan = columns.length + (actions ? 1 : 0);
      td.className = 'empty';
      td.textContent = 'none';
      tr.append(td);
      body.push(tr);
    }
    table.tBodies[0].replaceChildren(...body);
  }

  function note(name, text) {
    $(`${name}-note`).textContent = text || '';
    $(`${name}-note`).hidden = !text;
  }

  function traffic(row, direction) {
    const bps = row[`bitsPerSecondTo${direction}`];
    const packets = row[`packetsTo${direction}`];
    const octets = row[`bytesTo${direction}`];
    return `${si(bps, 'b/s')} · ${si(packets, 'pkt')} · ${bytes(octets)}`;
  }

  const TABLES = {
    allocations: {
      path: 'allocations',
      key: 'allocations',
      columns(rows) {
        const columns = [
          ['user', (r) => r.user],
          ['client', (r) => `${r.client} (${r.transport})`],
          ['relayed', (r) => r.relayed],
          ['age', (r) => duration(r.ageSeconds)],
          ['expires in', (r) => duration(r.expires - r.created - r.ageSeconds)],
          ['credential until', (r) => clock(r.usernameExpiry)],
          ['permissions', (r) => String(r.permissions)],
          ['channels', (r) => String(r.channels)],
        ];
        // Per-allocation traffic, where the relay reports it.
        if (rows.some((r) => 'bitsPerSecondToPeer' in r)) {
          columns.push(['to peer', (r) => traffic(r, 'Peer')], ['to client', (r) => traffic(r, 'Client')]);
        }
        return columns;
      },
      actions: (r) => [button('Revoke…', 'revoke', () => revoke(r.user))],
    },
    sessions: {
      path: 'sessions',
      key: 'sessions',
      columns: () => [
        ['user', (r) => r.user],
        ['transport', (r) => r.transport],
        ['address', (r) => r.address],
        ['connected', (r) => duration(serverNow() - r.connectedSince)],
        ['in / out', (r) => `${r.messagesIn} / ${r.messagesOut}`],
        ['call', (r) => r.callId || ''],
        ['node', (r) => r.node],
      ],
      actions: (r) => [
        button('Disconnect…', 'disconnect', () => disconnect(r.user)),
        button('Revoke…', 'revoke', () => revoke(r.user)),
      ],
    },
    calls: {
      path: 'calls',
      key: 'calls',
      columns: () => [
        ['caller', (r) => r.caller],
        ['callee', (r) => r.callee],
        ['type', (r) => r.type],
        ['state', (r) => r.state],
        ['age', (r) => duration(r.ageSeconds)],
        ['node', (r) => r.node],
      ],
      actions: null,
    },
    revocations: {
      path: 'revocations',
      key: 'revocations',
      columns: () => [
        ['user', (r) => r.user],
        ['issued', (r) => clock(r.issuedAt)],
        ['credentials refused until', (r) => (r.refusing ? clock(r.until) : 'not refused')],
      ],
      actions: null,
    },
    secrets: {
      path: 'secrets',
      key: 'secrets',
      columns: () => [
        ['id', (r) => r.id],
        ['state', (r) => r.state + (r.signing ? ', signing' : '')],
        ['age', (r) => duration(r.ageSeconds)],
        ['accepted until', (r) => (r.acceptedUntil === null ? 'while current' : clock(r.acceptedUntil))],
      ],
      actions: null,
    },
  };

  async function refreshTable(name) {
    const spec = TABLES[name];
    try {
      const answer = await (await api('GET', spec.path)).json();
      const rows = Array.isArray(answer[spec.key]) ? answer[spec.key] : [];
      fillTable(name, spec.columns(rows), rows, spec.actions);
      $(`${name}-count`).textContent = `(${rows.length}${answer.truncated ? '+' : ''})`;
      const unanswered = Array.isArray(answer.unanswered) && answer.unanswered.length
        ? `no answer from ${answer.unanswered.join(', ')}` : '';
      note(name, [answer.truncated ? 'more exist than listed' : '', unanswered].filter(Boolean).join('; '));
      if (name === 'secrets') $('rotate').disabled = $('prune').disabled = false;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err; // a wrong token, or a bug of the page's
      fillTable(name, [], [], null);
      $(`${name}-count`).textContent = '';
      note(name, err.message);
      if (name === 'secrets' && err.status === 403) $('rotate').disabled = $('prune').disabled = true;
    }
  }

  async function refreshTables() {
    const results = await Promise.allSettled(Object.keys(TABLES).map(refreshTable));
    const refused = results.find((r) => r.status === 'rejected');
    if (refused) throw refused.reason;
  }

  // ------------------------------------------------------------ actions

  function confirmWith(text, askPeriod) {
    const dialog = $('confirm');
    $('confirm-text').textContent = text;
    $('confirm-period-row').hidden = !askPeriod;
    $('confirm-period').value = '3600';
    return new Promise((resolve) => {
      const finish = (answer) => {
        $('confirm-form').removeEventListener('submit', onSubmit);
        $('confirm-cancel').removeEventListener('click', onCancel);
        dialog.removeEventListener('cancel', onCancel);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        finish({ periodS: Number($('confirm-period').value) });
      };
      const onCancel = (event) => {
        event.preventDefault();
        finish(null);
      };
      $('confirm-form').addEventListener('submit', onSubmit);
      $('confirm-cancel').addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel);
      dialog.showModal();
    });
  }

  function report(text, failed = false) {
    const status = $('action-status');
    status.textContent = text;
    status.dataset.state = failed ? 'error' : 'done';
    status.hidden = false;
  }

  async function act(describe, request) {
    try {
      report(describe(await (await request()).json()));
    } catch (err) {
      if (err instanceof Unauthorized) {
        askForToken(err);
        return;
      }
      if (!(err instanceof ApiError)) console.error(err);
      report(err.message, true);
    }
    refreshTables().catch((err) => {
      if (err instanceof Unauthorized) askForToken(err);
      else console.error(err);
    });
  }

  async function revoke(user) {
    const choice = await confirmWith(
      `Revoke user “${user}”? Its allocations end on every relay process sharing the ring store, `
      + 'and its credentials are refused for the time chosen.', true);
    if (!choice) return;
    const until = choice.periodS > 0 ? Math.round(serverNow()) + choice.periodS : null;
    await act(
      (a) => (a.until > a.issuedAt
        ? `${a.user}: allocations ended, credentials refused until ${clock(a.until)}`
        : `${a.user}: allocations ended (new ones are accepted)`),
      () => api('POST', 'revocations', { user, until }));
  }

  async function disconnect(user) {
    const choice = await confirmWith(
      `Disconnect user “${user}” from the signaling on every node? Its calls end as for a dropped connection.`,
      false);
    if (!choice) return;
    await act(
      (a) => `${a.user}: ${a.disconnected} session(s) disconnected`
        + (a.unanswered && a.unanswered.length ? `, no answer from ${a.unanswered.join(', ')}` : ''),
      () => api('DELETE', `sessions?user=${encodeURIComponent(user)}`));
  }

  $('rotate').addEventListener('click', async () => {
    if (!(await confirmWith('Rotate the secret ring? A new secret becomes current; the old one stays accepted for its grace.', false))) return;
    await act((a) => `new current secret ${a.current}, signing from ${clock(a.signingFrom)}`,
              () => api('POST', 'secrets/rotate'));
  });

  $('prune').addEventListener('click', async () => {
    if (!(await confirmWith('Prune the secrets past their grace?', false))) return;
    await act((a) => (a.pruned.length ? `pruned ${a.pruned.join(', ')}` : 'nothing to prune'),
              () => api('POST', 'secrets/prune'));
  });

  // ------------------------------------------------------------ polling and the token

  let history = new History();
  let running = false;
  let timer = null;
  let generation = 0; // bumped by stop(): a poll in flight then schedules nothing
  let polls = 0;

  function setStatus(state, text) {
    $('status').dataset.state = state;
    $('status').textContent = text;
  }

  async function pollMetrics() {
    const text = await (await api('GET', '../metrics')).text();
    if (text.length > MAX_METRICS_CHARS) throw new Error('the metrics text is larger than this page reads');
    const metrics = parseMetrics(text);
    const latest = history.add(Date.now() / 1000, metrics);
    $('login').hidden = true;
    $('board').hidden = false;
    $('forget-token').hidden = !sessionStorage.getItem(TOKEN_KEY);
    showTiles(metrics);
    draw(history, latest);
  }

  async function tick() {
    const mine = generation;
    try {
      await pollMetrics();
      if (polls % TABLES_EVERY === 0) await refreshTables();
      polls += 1;
      setStatus('live', `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err instanceof Unauthorized) {
        askForToken(err);
        return;
      }
      if (err instanceof ApiError) {
        setStatus('error', `cannot read the admin API: ${err.message}`);
      } else {
        console.error(err); // a bug of the page's: the console (and the tests) should see it
        setStatus('error', `page error: ${err.message}`);
      }
    }
    if (running && mine === generation) timer = setTimeout(tick, POLL_MS);
  }

  function start() {
    stop();
    running = true;
    polls = 0;
    setStatus('starting', 'connecting');
    tick();
  }

  function stop() {
    running = false;
    generation += 1;
    clearTimeout(timer);
  }

  function askForToken(err) {
    stop();
    sessionStorage.removeItem(TOKEN_KEY);
    $('login-message').textContent = err.sentToken
      ? 'The appliance refused that token (wrong token). Enter its admin.token.'
      : 'This appliance needs its admin token (admin.token).';
    $('login').dataset.reason = err.sentToken ? 'wrong-token' : 'token-needed';
    $('login').hidden = false;
    $('board').hidden = true;
    $('forget-token').hidden = true;
    setStatus('login', err.sentToken ? 'wrong token' : 'token needed');
    $('token-input').value = '';
    $('token-input').focus();
  }

  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token-input').value.trim();
    if (!token) return;
    if (!/^[\x21-\x7e]+$/.test(token)) { // what a header can carry
      $('login-message').textContent = 'A token is printable ASCII without spaces.';
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    history = new History(); // figures of another appliance or token do not mix
    start();
  });

  $('forget-token').addEventListener('click', () => { // then ask again, unless none is needed
    sessionStorage.removeItem(TOKEN_KEY);
    start();
  });

  window.addEventListener('resize', resizeCharts);
  $('library-missing').hidden = typeof uPlot !== 'undefined';
  start();
})();
