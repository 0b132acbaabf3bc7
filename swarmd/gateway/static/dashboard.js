// swarmd dashboard: reads the gateway's snapshot feed (Server-Sent Events framing over
// fetch, so the API key travels in the x-api-key header, never in a URL) and renders it.
// Everything that comes from peers (keys, model names, errors) is written with
// textContent, never as HTML.
'use strict';

const KEY_SLOT = 'swarmd.dashboard.key';
const FEED = '/api/v1/dashboard/feed';
let controller = null;
let retryMs = 1000;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function short(hex) { return hex ? hex.slice(0, 12) + '…' : '–'; }

function ago(ts) {
  if (!ts) return 'never';
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 2) return 'now';
  if (s < 120) return Math.round(s) + ' s ago';
  if (s < 7200) return Math.round(s / 60) + ' min ago';
  return Math.round(s / 3600) + ' h ago';
}

function duration(s) {
  if (s === null || s === undefined) return '–';
  if (s < 120) return Math.round(s) + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  if (s < 172800) return (s / 3600).toFixed(1) + ' h';
  return (s / 86400).toFixed(1) + ' d';
}

function num(v, digits) {
  if (v === null || v === undefined) return '–';
  return Number(v).toFixed(digits);
}

function fill(tableId, rows, render) {
  const body = $(tableId).tBodies[0];
  const out = document.createDocumentFragment();
  for (const row of rows) {
    const tr = document.createElement('tr');
    render(row, tr);
    out.appendChild(tr);
  }
  body.replaceChildren(out);
}

function cells(tr, values) {
  for (const v of values) {
    if (v instanceof Node) { const td = document.createElement('td'); td.appendChild(v); tr.appendChild(td); }
    else tr.appendChild(el('td', v));
  }
}

function tags(list, cls) {
  const f = document.createDocumentFragment();
  for (const t of list || []) f.appendChild(el('span', t, 'tag' + (cls ? ' ' + cls : '')));
  return f;
}

function keyCell(tr, hex) {
  const td = el('td', short(hex), 'key');
  td.title = hex || '';
  tr.appendChild(td);
}

function chart(svgId, series, classes) {
  const svg = $(svgId);
  svg.replaceChildren();
  const all = series.flat().filter((v) => v !== null && v !== undefined);
  const max = Math.max(1e-9, ...all);
  series.forEach((values, i) => {
    const n = values.length;
    if (n < 2) return;
    const pts = values.map((v, j) => `${(j / (n - 1)) * 300},${60 - ((v || 0) / max) * 56 - 2}`).join(' ');
    const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
    line.setAttribute('points', pts);
    line.setAttribute('class', classes[i]);
    svg.appendChild(line);
  });
}

function render(snap) {
  const nodes = snap.nodes || [];
  const workers = snap.workers || [];
  const models = (snap.models || []).filter((m) => m.name);
  $('nodes-count').textContent = nodes.filter((n) => n.up).length + ' / ' + nodes.length;
  $('workers-count').textContent = String(workers.filter((w) => w.up).length);
  $('models-count').textContent = String(models.length);
  const traffic = snap.traffic || [];
  const last = traffic[traffic.length - 1];
  $('rps-now').textContent = last ? num(last.rps, 0) : '0';

  fill('nodes-table', nodes, (n, tr) => {
    tr.dataset.key = n.public_key;
    tr.className = n.up ? 'up' : 'down';
    keyCell(tr, n.public_key);
    cells(tr, [tags(n.roles), n.nat || '–', n.path, n.version || '–', duration(n.uptime_s),
      n.up ? ago(n.last_seen) : (n.last_seen ? 'down, ' + ago(n.last_seen) : 'down')]);
  });
  fill('workers-table', workers, (w, tr) => {
    tr.dataset.key = w.public_key;
    tr.className = w.up ? 'up' : 'down';
    keyCell(tr, w.public_key);
    const h = w.health || {};
    const health = h.ejected ? tags(['ejected'], 'bad') : h.suspect ? tags(['avoided: ' + h.suspect], 'bad')
      : (w.state === 'DRAINING' ? tags(['draining'], 'bad')
      : (w.up ? tags(['healthy'], 'ok') : tags(['unreachable'], 'bad')));
    cells(tr, [w.state || '–', health, tags(w.models), num(w.queue, 0), num(w.in_flight, 0), num(w.ewma_ms, 2),
      num(w.rps, 1)]);
  });
  fill('models-table', models, (m, tr) => {
    tr.dataset.name = m.name;
    cells(tr, [m.name, tags(m.versions), String((m.loaded_on || []).length) + ' worker(s)',
      String((m.stored_on || []).length) + ' store(s)']);
  });
  fill('errors-table', (snap.errors || []).slice(0, 10), (e, tr) => {
    cells(tr, [ago(e.t), e.status, e.code, e.path, e.message]);
  });
  chart('chart-rps', [traffic.map((p) => p.rps)], ['s0']);
  chart('chart-latency', [traffic.map((p) => p.p50_ms), traffic.map((p) => p.p99_ms)], ['s0', 's1']);
  chart('chart-errors', [traffic.map((p) => p.errors)], ['err']);
  const g = snap.gateway || {};
  const crawl = snap.collect_error ? ' — last crawl failed: ' + snap.collect_error : '';
  $('footer').textContent = `gateway ${g.url || ''} · swarmd ${g.version || ''} · view of ${ago(snap.collected_at)}${crawl}`;
}

function showError(message) {
  const e = $('error');
  e.textContent = message;
  e.hidden = !message;
}

function setState(text, live) {
  const s = $('state');
  s.textContent = text;
  s.classList.toggle('live', !!live);
}

async function connect(key) {
  if (controller) controller.abort();
  controller = new AbortController();
  const mine = controller;
  setState('connecting…');
  let resp;
  try {
    resp = await fetch(FEED, { headers: { 'x-api-key': key, Accept: 'text/event-stream' }, signal: mine.signal,
      cache: 'no-store' });
  } catch (e) {
    if (mine.signal.aborted) return;
    return retry(key, 'gateway unreachable: ' + e.message);
  }
  if (!resp.ok) {
    let message = resp.status + ' ' + resp.statusText;
    try { const doc = await resp.json(); message = `${doc.code || resp.status}: ${doc.error || message}`; } catch (e) { /* not JSON */ }
    if (resp.status === 401 || resp.status === 403) {
      sessionStorage.removeItem(KEY_SLOT);
      setState('not connected');
      $('main').hidden = true;
      showError('The gateway refused this key — ' + message);
      return;
    }
    return retry(key, message);
  }
  sessionStorage.setItem(KEY_SLOT, key);
  showError('');
  setState('live', true);
  retryMs = 1000;
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
        if (data) { $('main').hidden = false; render(JSON.parse(data)); }
      }
    }
  } catch (e) {
    if (mine.signal.aborted) return;
  }
  if (!mine.signal.aborted) retry(key, 'the feed ended; reconnecting');
}

function retry(key, why) {
  setState('reconnecting: ' + why);
  setTimeout(() => connect(key), retryMs);
  retryMs = Math.min(retryMs * 2, 15000);
}

document.addEventListener('DOMContentLoaded', () => {
  $('auth').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('api-key').value.trim();
    if (!key) { showError('Enter an API key with models:read or admin.'); return; }
    connect(key);
  });
  const saved = sessionStorage.getItem(KEY_SLOT);
  if (saved) connect(saved);
});
