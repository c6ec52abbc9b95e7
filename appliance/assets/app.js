// The dashboard's scripts: live tables over /primus, metric charts (uPlot), actions
// without reloading, the live log tail. Every page works without them.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const csrf = () => ($('meta[name="csrf-token"]') || {}).content || '';

// Every time shown: the viewer's local time, ISO 8601 (UTC) on hover.
function showTime(t, at) {
  t.textContent = new Date(at).toLocaleString();
  t.dateTime = t.title = new Date(at).toISOString();
}

function formatTimes(root = document) {
  for (const t of $$('time[data-at]', root)) {
    const at = Number(t.dataset.at);
    if (at) showTime(t, at);
  }
}

function copyButtons() {
  for (const button of $$('[data-copy]')) {
    button.addEventListener('click', async () => {
      const text = $(button.dataset.copy).textContent.trim();
      try {
        await navigator.clipboard.writeText(text);
      } catch (_) {
        const range = document.createRange();
        range.selectNodeContents($(button.dataset.copy));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        document.execCommand('copy');
      }
      button.textContent = 'Copied';
      setTimeout(() => { button.textContent = 'Copy'; }, 2000);
    });
  }
}

// The header's toggle between dark and light, remembered in this browser (theme.js
// applies it on the next pages before they paint).
function themeToggle() {
  const button = $('#theme-toggle');
  if (!button) return;
  const root = document.documentElement;
  const dark = () => (root.dataset.theme || (matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light')) === 'dark';
  const label = () => { button.textContent = dark() ? 'Light mode' : 'Dark mode'; };
  button.addEventListener('click', () => {
    root.dataset.theme = dark() ? 'light' : 'dark';
    try { localStorage.setItem('km-theme', root.dataset.theme); } catch (_) { /* not remembered */ }
    label();
    document.dispatchEvent(new Event('km-theme'));
  });
  matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
    label();
    document.dispatchEvent(new Event('km-theme'));
  });
  label();
  button.hidden = false;
}

// A colour of the current scheme (a CSS variable of app.css).
const color = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function confirmForms() {
  for (const form of $$('form[data-confirm]')) {
    form.addEventListener('submit', (e) => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
  }
}

const memory = (bytes) => bytes >= 1 << 30 ? (bytes / (1 << 30)).toFixed(1) + ' GB' : (bytes / (1 << 20)).toFixed(1) + ' MB';
function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm';
  if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor(s % 3600 / 60) + 'm';
  return Math.floor(s / 86400) + 'd ' + Math.floor(s % 86400 / 3600) + 'h';
}

// The tokens of an RFC 6901 pointer.
const pointer = (path) => String(path).split('/').slice(1).map((t) => t.replace(/~1/g, '/').replace(/~0/g, '~'));

// Applies an agent's `status:patch` (RFC 6902 add/remove/replace, what agents send) to
// `doc` in place; false when an operation does not fit it (the status is fetched again).
function applyPatch(doc, ops) {
  for (const op of Array.isArray(ops) ? ops : []) {
    const path = pointer(op.path || '');
    const key = path.pop();
    let parent = doc;
    for (const t of path) parent = parent !== null && typeof parent === 'object' ? parent[t] : undefined;
    if (key === undefined || parent === null || typeof parent !== 'object') return false;
    if (Array.isArray(parent)) {
      const i = key === '-' ? parent.length : Number(key);
      const inside = Number.isInteger(i) && i >= 0 && i < parent.length;
      if (op.op === 'add' && Number.isInteger(i) && i >= 0 && i <= parent.length) parent.splice(i, 0, op.value);
      else if (op.op === 'replace' && inside) parent[i] = op.value;
      else if (op.op === 'remove' && inside) parent.splice(i, 1);
      else return false;
    } else if (op.op === 'add' || op.op === 'replace') {
      parent[key] = op.value;
    } else if (op.op === 'remove') {
      delete parent[key];
    } else {
      return false;
    }
  }
  return true;
}

// The latest status of each server of the bucket (only of `only`, if given), kept by
// applying its patches: the socket gets an agent's patches (~2 KB), not the whole status
// after each (~13 KB). Servers whose status is not known yet, or whose patch does not
// fit, are fetched: one request for all of them (at most every 2 s), not one each.
function statuses(bucket, only, deliver) {
  const known = new Map();
  let fetching = false;
  const url = `/api/bucket/${bucket}/data/status` + (only ? '?server_name=' + encodeURIComponent(only) : '');
  const fetchAll = () => {
    if (fetching) return;
    fetching = true;
    fetch(url, { credentials: 'same-origin' })
      .then((r) => (r.ok ? r.json() : []))
      .then((servers) => {
        for (const view of servers) {
          if (known.has(view.server_name) || !view.online) continue;
          const status = { data: view.data || {} };
          known.set(view.server_name, status);
          deliver(view.server_name, status);
        }
      })
      .catch(() => {})
      .finally(() => setTimeout(() => { fetching = false; }, 2000));
  };
  return {
    whole: (server, status) => known.set(server, status),
    patch: (server, ops) => {
      if (only && server !== only) return;
      const status = known.get(server);
      if (status && applyPatch(status, ops)) deliver(server, status);
      else { known.delete(server); fetchAll(); }
    },
    forget: () => known.clear(),
  };
}

// One socket to /primus (the session cookie authenticates it), reconnecting by itself;
// `page.verify` runs after each reconnection (events sent meanwhile are lost).
function watch(live, page, onState) {
  let delay = 500;
  let opened = false;
  const servers = statuses(live.dataset.bucket, live.dataset.server, (server, status) => page.onEvent(server, 'status', status));
  const open = () => {
    const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/primus');
    ws.onopen = () => {
      delay = 500;
      onState('live');
      // Everything, with status patches instead of whole statuses after each patch.
      ws.send(JSON.stringify({ action: 'sub', public_id: live.dataset.public, filters: ['*', 'status:patch'] }));
      if (opened) page.verify();
      opened = true;
    };
    ws.onmessage = (msg) => {
      let packet;
      try { packet = JSON.parse(msg.data).data[1]; } catch (_) { return; }
      for (const [event, payload] of Object.entries(packet)) {
        if (event === 'server_name') continue;
        if (event === 'status:patch') {
          servers.patch(packet.server_name, payload);
          continue;
        }
        if (event === 'status') servers.whole(packet.server_name, payload);
        page.onEvent(packet.server_name, event, payload);
      }
    };
    ws.onclose = () => {
      servers.forget();
      onState('reconnecting…');
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  open();
}

function updateRow(row, p) {
  const set = (field, html) => { const cell = $(`[data-field="${field}"]`, row); if (cell && cell.innerHTML !== html) cell.innerHTML = html; };
  const status = String(p.status || '').replace(/[^a-z-]/g, '');
  set('status', `<span class="badge ${status}">${status}</span>`);
  set('cpu', (p.cpu || 0) + '%');
  set('memory', memory(p.memory || 0));
  set('restarts', String(p.restart_time || 0));
  set('uptime', p.status === 'online' ? duration(Date.now() - (p.pm_uptime || Date.now())) : '-');
}

// Re-reads this page and swaps in each of `selectors` (processes or servers came or
// went, a server went offline): the server renders them by the API's rules. One request
// per list of selectors; one asked for while it runs is made once more after it.
// `retries` (ms): while the fresh copy is the same as the shown one, tries again after
// each delay (an agent's event reaches the browser before km has stored it).
const refreshing = {};
function refresh(selectors, retries = []) {
  const key = selectors.join(',');
  if (refreshing[key]) { refreshing[key] = 'again'; return; }
  refreshing[key] = 'busy';
  const attempt = (left) => fetch(location.href, { credentials: 'same-origin' })
    .then((r) => r.text())
    .then((html) => {
      const doc = new DOMParser().parseFromString(html, 'text/html');
      const pairs = selectors.map((sel) => [$(sel, doc), $(sel)]).filter(([fresh, shown]) => fresh && shown);
      for (const [fresh] of pairs) formatTimes(fresh);
      if (pairs.every(([fresh, shown]) => fresh.innerHTML === shown.innerHTML) && left.length) {
        return new Promise((resolve) => setTimeout(resolve, left[0])).then(() => attempt(left.slice(1)));
      }
      for (const [fresh, shown] of pairs) shown.replaceWith(fresh);
    });
  attempt(retries).catch(() => {}).finally(() => setTimeout(() => {
    const again = refreshing[key] === 'again';
    refreshing[key] = null;
    if (again) refresh(selectors, retries);
  }, 1000));
}

// Brings the rows of `server` under `root` to its status (only the instances of the app
// `only`, if given): cells updated, rows of processes no longer listed (scaled down,
// deleted) removed. True when the rows changed: one was removed or one is missing.
function syncRows(root, server, status, only) {
  const listed = new Set();
  let changed = false;
  for (const p of ((status.data || {}).process || [])) {
    if (only && p.name !== only) continue;
    const key = server + '/' + p.pm_id;
    listed.add(key);
    const row = $(`tr[data-key="${CSS.escape(key)}"]`, root);
    if (row) updateRow(row, p); else changed = true;
  }
  for (const row of $$('tr[data-key]', root)) {
    if (!listed.has(row.dataset.key)) { row.remove(); changed = true; }
  }
  return changed;
}

// km's event when a server's last agent socket ended (realtime/presence.rs).
const SERVER_OFFLINE = 'server:offline';
// How often the page compares its servers' online state with the API's: a lost event (a
// node gone without a word, a full outbox) is caught within this time.
const VERIFY_MS = 20000;

// Asks the API (`online` per server, the rule the pages are rendered by) and refreshes
// `selectors` when a server shown (an element with data-server and data-online) differs.
function verifier(live, selectors) {
  const only = live.dataset.server;
  const url = `/api/bucket/${live.dataset.bucket}/data/status` + (only ? '?server_name=' + encodeURIComponent(only) : '');
  const verify = () => fetch(url, { credentials: 'same-origin' })
    .then((r) => (r.ok ? r.json() : []))
    .then((servers) => {
      const shown = Object.fromEntries($$('[data-server][data-online]').map((el) => [el.dataset.server, el.dataset.online === 'true']));
      if (servers.some((s) => shown[s.server_name] !== s.online)) refresh(selectors);
    })
    .catch(() => {});
  setInterval(verify, VERIFY_MS);
  return verify;
}

function addLine(list, text, cls) {
  const placeholder = $('.muted', list);
  if (placeholder && list.children.length === 1) placeholder.remove();
  const li = document.createElement('li');
  if (cls) li.className = cls;
  const time = document.createElement('time');
  showTime(time, Date.now());
  li.append(time, ' ' + text);
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

const short = (v) => (typeof v === 'string' ? v : JSON.stringify(v === undefined ? null : v)).slice(0, 300);

// What a reply or command result says, in a line.
function replyText(event, p) {
  const data = p.data !== undefined ? p.data : p;
  switch (event) {
    case 'trigger:pm2:result': {
      const meta = p.meta || {}, ret = p.ret || {};
      return `${meta.method_name || 'command'}: ` + (ret.err ? 'failed: ' + short(ret.err) : 'done' + (typeof ret.data === 'string' ? ' (' + ret.data + ')' : ''));
    }
    case 'trigger:action:success': return `${data.action_name || 'action'}: started`;
    case 'trigger:action:failure': return `${data.action_name || 'action'}: failed: ${short(data.err || data.msg || data)}`;
    case 'axm:reply': return `${data.action_name || 'action'} replied: ${short(data.return)}`;
    default: return `${data.action_name || 'scoped action'} ${event.split(':').pop()}: ${short(data.data !== undefined ? data.data : data)}`;
  }
}

const REPLIES = ['trigger:pm2:result', 'trigger:action:success', 'trigger:action:failure', 'axm:reply',
  'axm:scoped_action:stream', 'axm:scoped_action:end', 'axm:scoped_action:error', 'axm:scoped_action:success'];

// Charts: the stored history of a time range (the app's series per instance, or the
// host's when the page has no app), then, while the range ends now, the live values of
// each status. `valuesOf(status, names)` gives {metric: {line: number}}; a line is an
// instance's pm_id or `all` (the instances summed or averaged).
const CHART_NAMES = {
  cpu: 'cpu (%)', load: 'load (1 min)', host_cpu: 'host CPU (%)', host_memory_used: 'host memory used (%)', host_disk_free: 'host disk free (%)'
};
// The range picker (minutes back); a custom range takes two dates.
const RANGES = [[60, '1 h'], [360, '6 h'], [1440, '24 h'], [10080, '7 d'], [43200, '30 d']];
// Steps a chart asks the server for at most: it picks a step that fits the range.
const CHART_POINTS = 360;
// Live points kept per chart.
const LIVE_POINTS = 3600;

// How an app's instances combine into one line: cpu, memory and `sum` metrics add up.
const summed = (name, aggType) => name === 'cpu' || name === 'memory' || aggType === 'sum';

function rangePicker(box, onPick) {
  const tools = document.createElement('div');
  tools.className = 'chart-tools';
  tools.setAttribute('role', 'group');
  tools.setAttribute('aria-label', 'Time range of the charts');
  const press = (button) => {
    for (const b of $$('button[data-minutes], #range-apply', tools)) b.setAttribute('aria-pressed', String(b === button));
  };
  for (const [minutes, label] of RANGES) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'range';
    b.dataset.minutes = String(minutes);
    b.textContent = label;
    b.addEventListener('click', () => { press(b); onPick({ minutes, until: null }); });
    tools.append(b);
  }
  tools.insertAdjacentHTML('beforeend', '<label>From <input type="datetime-local" id="range-from"></label>' +
    '<label>To <input type="datetime-local" id="range-to"></label><button type="button" class="range" id="range-apply">Show</button>');
  $('#range-apply', tools).addEventListener('click', () => {
    const from = Date.parse($('#range-from', tools).value), to = Date.parse($('#range-to', tools).value);
    if (!(from < to)) return;
    press($('#range-apply', tools));
    onPick({ minutes: Math.ceil((to - from) / 60000), until: to });
  });
  box.before(tools);
  press($('button[data-minutes]', tools));
}

function charts(live, valuesOf) {
  const box = $('#charts');
  if (!box || !window.uPlot) return null;
  const names = box.dataset.metrics.split('|').filter(Boolean);
  const app = live.dataset.app || '';
  let range = { minutes: RANGES[0][0], until: null };
  const charts = {};
  for (const name of names) {
    const fig = document.createElement('figure');
    fig.className = 'chart';
    fig.dataset.metric = name;
    fig.innerHTML = '<figcaption></figcaption>';
    $('figcaption', fig).textContent = CHART_NAMES[name] || name;
    box.append(fig);
    // xs (seconds) and one array of values per line, aligned on xs.
    charts[name] = { fig, xs: [], lines: new Map(), plot: null, shape: '' };
  }
  const width = (fig) => Math.max(200, fig.clientWidth);
  // (Re)makes the plot when its lines changed, then gives it the data.
  const draw = (name) => {
    const c = charts[name];
    const keys = Array.from(c.lines.keys()).sort((a, b) => (a === 'all') - (b === 'all') || Number(a) - Number(b));
    const shape = keys.join(',');
    if (!c.plot || shape !== c.shape) {
      if (c.plot) c.plot.destroy();
      const axis = () => ({ stroke: () => color('--muted'), grid: { stroke: () => color('--line') }, ticks: { stroke: () => color('--line') } });
      const yAxis = { ...axis(), size: name === 'memory' ? 70 : 60 };
      const value = (u, v) => (v == null ? '-' : name === 'memory' ? memory(v) : Number(v.toFixed(2)));
      if (name === 'memory') yAxis.values = (u, splits) => splits.map(memory);
      const series = keys.map((key) => ({
        label: key === 'all' ? (c.combine || name) : `pm_id ${key}`,
        stroke: key === 'all' ? () => color('--accent') : () => color('--muted'),
        width: key === 'all' ? 2 : 1, spanGaps: true, value,
      }));
      c.plot = new uPlot({ width: width(c.fig), height: 160, legend: { live: true },
        series: [{ value: (u, v) => (v == null ? '' : new Date(v * 1000).toLocaleString()) }, ...series],
        axes: [axis(), yAxis] }, [[]], c.fig);
      c.shape = shape;
      c.keys = keys;
      if (window.ResizeObserver && !c.observed) {
        c.observed = true;
        new ResizeObserver(() => { if (c.plot.width !== width(c.fig)) c.plot.setSize({ width: width(c.fig), height: 160 }); }).observe(c.fig);
      }
    }
    const data = [c.xs, ...c.keys.map((key) => c.lines.get(key))];
    if (range.until || range.minutes !== RANGES[0][0]) {
      // A range picked: its whole window, whatever the points cover.
      const end = (range.until || Date.now()) / 1000;
      c.plot.setData(data, false);
      c.plot.setScale('x', { min: end - range.minutes * 60, max: end });
    } else if (c.xs.length === 1) {
      // The live hour fits its points; one point alone would stretch the axis over years.
      c.plot.setData(data, false);
      c.plot.setScale('x', { min: c.xs[0] - 30, max: c.xs[0] + 30 });
    } else {
      c.plot.setData(data);
    }
    c.fig.dataset.points = String(c.xs.length);
    c.fig.dataset.lines = shape;
  };
  document.addEventListener('km-theme', () => { for (const c of Object.values(charts)) if (c.plot) c.plot.redraw(false); });
  // Adds a point at `x` with {line: value}; lines first seen get nulls before it.
  const add = (c, x, values) => {
    for (const key of Object.keys(values)) {
      if (!c.lines.has(key)) c.lines.set(key, new Array(c.xs.length).fill(null));
    }
    c.xs.push(x);
    for (const [key, list] of c.lines) list.push(key in values ? values[key] : null);
  };
  const load = () => {
    const body = { server_name: live.dataset.server, app_name: app, before: range.minutes, max_points: CHART_POINTS,
      metrics: names, instances: app !== '' };
    if (range.until) body.until = range.until;
    return fetch(`/api/bucket/${live.dataset.bucket}/data/metrics/histogram`, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'content-type': 'application/json', 'x-csrf-token': csrf() },
      body: JSON.stringify(body),
    }).then((r) => r.json()).then((history) => {
      const metrics = ((history[live.dataset.server] || {})[app]) || {};
      for (const name of names) {
        const c = charts[name];
        const m = metrics[name] || {};
        c.xs = []; c.lines = new Map();
        c.combine = app === '' ? null : summed(name, m.agg_type) ? 'sum' : 'average';
        if (m.unit) $('figcaption', c.fig).textContent = `${name} (${m.unit})`;
        // Every step of any instance, oldest first; the combined line sums the instances'
        // averages or takes the merged average.
        const steps = new Map();
        for (const [pmId, list] of Object.entries(m.instances || {})) {
          for (const p of list) (steps.get(p.at) || steps.set(p.at, {}).get(p.at))[pmId] = p.avg;
        }
        for (const p of m.timestamps_and_stats || []) {
          const step = steps.get(p.at) || steps.set(p.at, {}).get(p.at);
          step.all = c.combine === 'sum' ? Object.values(step).reduce((a, b) => a + b, 0) : p.avg;
        }
        for (const at of Array.from(steps.keys()).sort((a, b) => a - b)) add(c, at / 1000, steps.get(at));
        c.fig.dataset.stored = String(steps.size);
        if (c.xs.length || c.plot) draw(name);
      }
    }).catch(() => {});
  };
  rangePicker(box, (picked) => { range = picked; load(); });
  load();
  return (status) => {
    if (range.until) return;
    const now = Date.now() / 1000;
    const values = valuesOf(status, names);
    for (const name of names) {
      const v = values[name];
      if (!v || !Object.keys(v).length) continue;
      const c = charts[name];
      if (c.combine === undefined) c.combine = app === '' ? null : summed(name) ? 'sum' : 'average';
      add(c, now, v);
      if (c.xs.length > LIVE_POINTS) { c.xs.shift(); for (const list of c.lines.values()) list.shift(); }
      draw(name);
    }
  };
}

// A metric of a process now: cpu and memory, or a custom metric's number.
function metricOf(p, name) {
  if (name === 'cpu' || name === 'memory') return Number(p[name]);
  const probe = (p.axm_monitor || {})[name];
  return probe ? parseFloat(probe.value) : NaN;
}

// Each instance's value of each metric, and their sum (cpu, memory, `sum` metrics) or
// average as `all`.
const appValues = (app) => (status, names) => {
  const processes = ((status.data || {}).process || []).filter((p) => p.name === app);
  const values = {};
  for (const name of names) {
    const lines = {};
    let aggType;
    for (const p of processes) {
      const v = metricOf(p, name);
      if (!Number.isNaN(v)) lines[p.pm_id] = v;
      aggType = aggType || ((p.axm_monitor || {})[name] || {}).agg_type;
    }
    const known = Object.values(lines);
    if (!known.length) continue;
    const sum = known.reduce((a, b) => a + b, 0);
    lines.all = summed(name, aggType) ? sum : sum / known.length;
    values[name] = lines;
  }
  return values;
};

// The host's load and the sums of its processes' cpu and memory (the stored host series).
const hostValues = (status) => {
  const data = status.data || {};
  const processes = data.process || [];
  const sum = (name) => processes.reduce((total, p) => total + (Number(p[name]) || 0), 0);
  const load = Number(((data.server || {}).loadavg || [])[0]);
  return { load: Number.isNaN(load) ? {} : { all: load }, cpu: { all: sum('cpu') }, memory: { all: sum('memory') } };
};

function postAction(fields) {
  const form = $('form.js-action');
  return fetch(form.action, {
    method: 'POST', credentials: 'same-origin',
    headers: { 'content-type': 'application/x-www-form-urlencoded', 'x-requested-with': 'fetch' },
    body: new URLSearchParams({ csrf: csrf(), ...fields }),
  }).then(async (r) => {
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.msg || r.statusText);
    return body;
  });
}

// How often a live tail asks the agent again for logs (it stops after 120 s).
const LOGS_RENEWED_MS = 60000;

function processPage(live) {
  const server = live.dataset.server, app = live.dataset.app;
  const replies = $('#replies');
  const events = $('#events');
  const chartsUpdate = charts(live, appValues(app));
  for (const form of $$('form.js-action')) {
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const fields = Object.fromEntries(new FormData(form));
      postAction(fields).then((r) => addLine(replies, r.msg + (r.uuid ? ' (' + r.uuid + ')' : ''), 'sent'),
        (err) => addLine(replies, err.message, 'error'));
    });
  }
  const tail = $('#tail'), start = $('#tail-start'), stop = $('#tail-stop');
  // A bucket that collects logs gets them all the time: the tail only shows them.
  const collecting = $('#logs').dataset.collecting === 'true';
  const logging = (method) => (collecting ? Promise.resolve() : postAction({ kind: 'pm2', method_name: method }));
  let tailing = false;
  // The agent stops sending logs 120 s after a startLogging: asked again while tailing.
  let renew = null;
  if (start) {
    start.addEventListener('click', () => logging('startLogging').then(() => {
      tailing = true; tail.hidden = false; start.hidden = true; stop.hidden = false;
      if (!collecting) renew = setInterval(() => logging('startLogging').catch(() => {}), LOGS_RENEWED_MS);
    }, (err) => addLine(replies, err.message, 'error')));
    stop.addEventListener('click', () => logging('stopLogging').finally(() => {
      clearInterval(renew);
      tailing = false; start.hidden = false; stop.hidden = true;
    }));
  }
  // The server's state and the instances' rows, rendered by the server.
  const parts = ['#server-state', 'table.processes'];
  const onEvent = (from, event, payload) => {
    if (from !== server) return;
    if (event === 'status') {
      const changed = syncRows($('table.processes'), server, payload, app);
      // A status comes from a connected agent: a server shown offline is back.
      if (changed || $('#server-state').dataset.online !== 'true') refresh(parts);
      if (chartsUpdate) chartsUpdate(payload);
    } else if (event === SERVER_OFFLINE) {
      refresh(parts);
    } else if (event === 'logs' && tailing && (payload.process || {}).name === app) {
      tail.textContent += payload.data;
      if (tail.textContent.length > 200000) tail.textContent = tail.textContent.slice(-100000);
      tail.scrollTop = tail.scrollHeight;
    } else if (event === 'process:exception' && (payload.process || {}).name === app) {
      addLine(replies, 'exception: ' + ((payload.data || {}).message || ''), 'error');
      refresh(['#issues'], [300, 700, 1500, 3000]);
    } else if (REPLIES.includes(event)) {
      const process = payload.process || {};
      if (process.name && process.name !== app) return;
      const failed = event.includes('failure') || event.includes('error') || ((payload.ret || {}).err);
      addLine(replies, replyText(event, payload), failed ? 'error' : 'reply');
    } else if ((event === 'process:event' || event === 'human:event') && (payload.process || {}).name === app) {
      const what = event === 'process:event' ? 'process ' + payload.event : (payload.name || 'event');
      addLine(events, what + ' ' + (event === 'human:event' ? short(payload.data) : 'pm_id ' + (payload.process || {}).pm_id), '');
    }
  };
  return { onEvent, verify: verifier(live, parts) };
}

// How often at most the overview's fleet summary (sums, host figures, problems) is
// re-read while statuses arrive; rows of processes follow each status.
const FLEET_REFRESH_MS = 5000;

// `fn` at most once per `ms`, the last call of a burst included.
function throttled(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}

function overviewPage(live) {
  // The servers and the licence's process count, rendered by the server.
  const parts = ['#licence', '#fleet', '#servers'];
  const fleet = throttled(() => refresh(['#fleet']), FLEET_REFRESH_MS);
  const onEvent = (from, event, payload) => {
    if (event === SERVER_OFFLINE) {
      refresh(parts);
    } else if (event === 'status') {
      const section = $(`section.server[data-server="${CSS.escape(from)}"]`);
      // A status comes from a connected agent: a server shown offline is back.
      if (!section || syncRows(section, from, payload, null) || section.dataset.online !== 'true') refresh(parts);
      else fleet();
    } else if (event === 'process:event') {
      fleet();
    }
  };
  return { onEvent, verify: verifier(live, parts) };
}

// A server's page: its host's figures and charts, and its processes' rows.
function serverPage(live) {
  const server = live.dataset.server;
  const parts = ['#server-state', '#host dl', 'table.processes'];
  const host = throttled(() => refresh(['#host dl']), FLEET_REFRESH_MS);
  const chartsUpdate = charts(live, hostValues);
  const onEvent = (from, event, payload) => {
    if (from !== server) return;
    if (event === 'status') {
      const changed = syncRows($('table.processes'), server, payload, null);
      if (changed || $('#server-state').dataset.online !== 'true') refresh(parts);
      else host();
      if (chartsUpdate) chartsUpdate(payload);
    } else if (event === SERVER_OFFLINE) {
      refresh(parts);
    }
  };
  return { onEvent, verify: verifier(live, parts) };
}

// Lines the explorer keeps on the page while following.
const EXPLORER_LINES = 1000;

// The log explorer: "Follow live" adds the lines agents send that pass the filters.
function logsPage(live) {
  const list = $('#log-lines'), follow = $('#follow');
  const filter = Object.fromEntries(new FormData($('#log-filters')));
  let following = false;
  follow.hidden = false;
  follow.addEventListener('click', () => {
    following = !following;
    follow.setAttribute('aria-pressed', String(following));
    follow.textContent = following ? 'Stop following' : 'Follow live';
  });
  const passes = (server, p) => {
    const process = p.process || {};
    const text = String(p.data || '');
    return (!filter.app || process.name === filter.app) && (!filter.server || server === filter.server) &&
      (!filter.pm_id || String(process.pm_id) === filter.pm_id.trim()) &&
      (!filter.stream || (p.log_type === 'err' ? 'err' : 'out') === filter.stream) &&
      (!filter.q || text.toLowerCase().includes(filter.q.toLowerCase()));
  };
  const line = (server, p) => {
    const process = p.process || {};
    const li = document.createElement('li');
    li.className = p.log_type === 'err' ? 'err' : 'out';
    const time = document.createElement('time');
    showTime(time, Number(p.at) || Date.now());
    const app = document.createElement('a');
    app.href = `/buckets/${live.dataset.bucket}/servers/${encodeURIComponent(server)}/apps/${encodeURIComponent(process.name || '')}`;
    app.textContent = process.name || '';
    const where = document.createElement('span');
    where.className = 'where';
    where.textContent = `${server} [${process.pm_id}]`;
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = String(p.data || '').replace(/[\r\n]+$/, '');
    li.append(time, ' ', app, ' ', where, ' ', text);
    return li;
  };
  const onEvent = (server, event, payload) => {
    if (!following || event !== 'logs' || !passes(server, payload)) return;
    const empty = $('#no-lines');
    if (empty) empty.remove();
    list.prepend(line(server, payload));
    while (list.children.length > EXPLORER_LINES) list.lastChild.remove();
  };
  return { onEvent, verify: () => {} };
}

const PAGES = { overview: overviewPage, process: processPage, server: serverPage, logs: logsPage };

document.addEventListener('DOMContentLoaded', () => {
  formatTimes();
  themeToggle();
  copyButtons();
  confirmForms();
  const live = $('#live');
  if (!live) return;
  const state = $('#live-state');
  const page = PAGES[live.dataset.page](live);
  watch(live, page, (text) => { state.textContent = text; state.dataset.state = text; });
});
