// modelwatch dashboard: plain JavaScript, SVG charts drawn here, no
// dependencies and nothing fetched from outside this server (works offline).
// Routes (hash): #/ overview, #/model/<id>?version=..., #/alerts, #/compare/<id>?a=..&b=..
'use strict';

const COLORS = ['#3366cc', '#dc3912', '#ff9900', '#109618', '#990099', '#0099c6', '#dd4477', '#66aa00'];
let refreshSeconds = 10;
let windowSeconds = 300;
let timer = null;

function esc(s) {
  return String(s === null || s === undefined ? '' : s)
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}
function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (Number.isInteger(v) && Math.abs(v) >= 1) return v.toLocaleString('en-US');
  return Number(v).toFixed(digits === undefined ? 3 : digits);
}
function time(s) {
  const d = new Date(s * 1000);
  return d.toISOString().replace('T', ' ').slice(0, 16);
}
function clock(s) {
  return new Date(s * 1000).toISOString().slice(11, 16);
}
async function api(path) {
  const r = await fetch(path, { credentials: 'same-origin' });
  if (r.status === 401) { location.href = '/'; throw new Error('unauthorized'); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
function route() {
  const h = location.hash.replace(/^#/, '') || '/';
  const [path, query] = h.split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, params };
}
function setNav(name) {
  document.querySelectorAll('[data-nav]').forEach(a => a.classList.toggle('active', a.dataset.nav === name));
}

// ------------------------------------------------------------------ charts

// series: [{name, points: [[x, y], ...]}]; opts: {title, id, yMin, yMax, baseline, height}
function lineChart(series, opts) {
  const W = 640, H = opts.height || 220, L = 52, R = 12, T = 12, B = 28;
  const all = series.flatMap(s => s.points);
  if (!all.length) return `<div class="muted" data-chart="${esc(opts.id)}" data-points="0">No data yet.</div>`;
  let xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  if (opts.baseline !== undefined) ys = ys.concat([opts.baseline]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || x0 + 1;
  let y0 = opts.yMin !== undefined ? Math.min(opts.yMin, ...ys) : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? Math.max(opts.yMax, ...ys) : Math.max(...ys);
  if (y1 === y0) { y1 = y0 + 1; }
  const X = x => L + (x1 === x0 ? (W - L - R) / 2 : (x - x0) / (x1 - x0) * (W - L - R));
  const Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let g = '';
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4, y = Y(v);
    g += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="#eee"/><text x="${L - 6}" y="${y + 4}" text-anchor="end">${fmt(v, 2)}</text>`;
  }
  g += `<text x="${L}" y="${H - 8}">${esc(time(x0))}</text><text x="${W - R}" y="${H - 8}" text-anchor="end">${esc(time(x1))}</text>`;
  if (opts.baseline !== undefined) {
    const y = Y(opts.baseline);
    g += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="#888" stroke-dasharray="4 3"/><text x="${W - R}" y="${y - 4}" text-anchor="end">baseline ${fmt(opts.baseline, 2)}</text>`;
  }
  series.forEach((s, i) => {
    const c = s.color || COLORS[i % COLORS.length];
    const pts = s.points.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(' ');
    g += `<polyline fill="none" stroke="${c}" stroke-width="2" ${s.dashed ? 'stroke-dasharray="5 3"' : ''} points="${pts}"/>`;
    s.points.forEach(p => {
      g += `<circle cx="${X(p[0]).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}" r="2.5" fill="${c}"><title>${esc(s.name)} ${esc(time(p[0]))}: ${fmt(p[1], 4)}</title></circle>`;
    });
  });
  const legend = series.map((s, i) => `<span style="--c:${s.color || COLORS[i % COLORS.length]}">${esc(s.name)}</span>`).join('');
  return `<svg viewBox="0 0 ${W} ${H}" width="100%" data-chart="${esc(opts.id)}" data-points="${all.length}">${g}</svg><div class="legend">${legend}</div>`;
}

function heatColor(v) {
  if (v === null || v === undefined) return '#f0f0f0';
  const t = Math.max(0, Math.min(1, v / 0.5));
  const r = 255, gb = Math.round(245 - t * 200);
  return `rgb(${r},${gb},${Math.round(gb * 0.9)})`;
}
function heatmap(h) {
  if (!h.features.length) return '<div class="muted" data-chart="heatmap">No drift rows yet (drift needs a reference profile).</div>';
  const cw = Math.max(6, Math.min(28, Math.floor(760 / Math.max(1, h.windows.length)))), ch = 20, L = 130, T = 6;
  const W = L + cw * h.windows.length + 10, H = T + ch * h.features.length + 24;
  let g = '';
  let drifted = 0;
  h.features.forEach((f, i) => {
    g += `<text x="${L - 6}" y="${T + i * ch + 14}" text-anchor="end">${esc(f)}</text>`;
    h.windows.forEach((w, j) => {
      const v = h.values[i][j], d = h.drift_detected[i][j];
      if (d === 1) drifted++;
      g += `<rect class="cell${d === 1 ? ' drifted' : ''}" x="${L + j * cw}" y="${T + i * ch}" width="${cw - 1}" height="${ch - 1}" fill="${heatColor(v)}" ${d === 1 ? 'stroke="#a00" stroke-width="1.5"' : ''}><title>${esc(f)} ${esc(time(w))}: ${esc(h.metric)} ${fmt(v, 4)}${d === 1 ? ' (drift detected)' : ''}</title></rect>`;
    });
  });
  if (h.windows.length) {
    g += `<text x="${L}" y="${H - 6}">${esc(time(h.windows[0]))}</text>`;
    if (h.windows.length > 3) g += `<text x="${L + cw * h.windows.length}" y="${H - 6}" text-anchor="end">${esc(clock(h.windows[h.windows.length - 1]))}</text>`;
  }
  return `<svg viewBox="0 0 ${W} ${H}" width="100%" style="max-width:${W * 1.3}px" data-chart="heatmap" data-features="${h.features.length}" data-drifted-cells="${drifted}">${g}</svg>
    <div class="legend"><span style="--c:${heatColor(0)}">${esc(h.metric)} 0</span><span style="--c:${heatColor(0.25)}">0.25</span><span style="--c:${heatColor(0.5)}">≥ 0.5</span><span style="--c:#a00">outlined: drift detected</span></div>`;
}

function seriesOf(ts, label) {
  return ts.series.map(s => ({ name: label(s), points: s.points.map(p => [p.window_start, p.value]) }));
}

// ------------------------------------------------------------------ pages

async function overview(el) {
  setNav('overview');
  const [m, a] = await Promise.all([api(`/api/models?window=${windowSeconds}`), api('/api/alerts?open=true&limit=20')]);
  if (!m.models.length) {
    el.innerHTML = '<h1>Models</h1><p class="muted">No model has reported yet. Produce prediction events to Kafka (or run <code>modelwatch demo</code>).</p>';
    return;
  }
  const cards = m.models.map(model => {
    const rows = model.versions.map(v => {
      const l = v.latest || {};
      const val = k => (l[k] ? l[k].value : null);
      return `<tr data-version="${esc(v.model_version)}"><td>${esc(v.model_version)}</td><td>${esc(v.task || '')}</td>
        <td class="num" data-field="accuracy">${fmt(val('accuracy'))}</td><td class="num" data-field="estimated_accuracy">${fmt(val('estimated_accuracy'))}</td>
        <td class="num">${fmt(val('prediction_count'))}</td><td class="num">${fmt(val('label_coverage'))}</td>
        <td>${v.drifted_features.map(esc).join(', ') || '–'}</td></tr>`;
    }).join('');
    return `<div class="card model-card" data-model="${esc(model.model_id)}">
      <h2><a href="#/model/${encodeURIComponent(model.model_id)}">${esc(model.model_id)}</a> <span class="badge ${model.status}" data-field="status">${model.status}</span></h2>
      <div class="kpis">
        <div class="kpi"><div class="v" data-field="open_alerts">${model.open_alerts}</div><div class="l">open alerts</div></div>
        <div class="kpi"><div class="v" data-field="drifted_count">${model.drifted_features.length}</div><div class="l">drifted features (latest window)</div></div>
        <div class="kpi"><div class="v">${model.versions.length}</div><div class="l">versions</div></div>
      </div>
      <table><tr><th>version</th><th>task</th><th>accuracy</th><th>est. accuracy</th><th>predictions</th><th>label coverage</th><th>drifted features</th></tr>${rows}</table>
      <p><a href="#/model/${encodeURIComponent(model.model_id)}">time series, drift heatmap, segments →</a>
      ${model.versions.length > 1 ? ` · <a href="#/compare/${encodeURIComponent(model.model_id)}?a=${encodeURIComponent(model.versions[0].model_version)}&b=${encodeURIComponent(model.versions[1].model_version)}">compare versions →</a>` : ''}</p>
    </div>`;
  }).join('');
  el.innerHTML = `<h1>Models</h1><div class="cards">${cards}</div>
    <div class="card"><h2>Open alerts</h2>${alertTable(a.alerts)}</div>`;
}

function alertTable(alerts) {
  if (!alerts.length) return '<p class="muted" data-alerts="0">No alerts.</p>';
  const rows = alerts.map(x => `<tr class="alert-row" data-alert="${esc(x.alert_id)}">
    <td>${esc(time(x.fired_at_ms / 1000))}</td><td><span class="badge ${esc(x.status)}">${esc(x.status)}</span></td>
    <td><span class="badge ${x.severity === 'critical' ? 'critical' : 'warning'}">${esc(x.severity)}</span></td>
    <td>${esc(x.rule)}</td><td><a href="#/model/${encodeURIComponent(x.model_id)}?version=${encodeURIComponent(x.model_version)}">${esc(x.model_id)}</a> ${esc(x.model_version)}</td>
    <td>${esc(x.feature || '')}</td><td class="num">${fmt(x.value)}</td><td>${esc(time(x.window_start_ms / 1000))}</td><td>${esc(x.message)}</td></tr>`).join('');
  return `<table data-alerts="${alerts.length}"><tr><th>fired</th><th>status</th><th>severity</th><th>rule</th><th>model</th><th>feature</th><th>value</th><th>window</th><th>message</th></tr>${rows}</table>`;
}

async function modelPage(el, id, params) {
  setNav('');
  const m = await api(`/api/models/${encodeURIComponent(id)}?window=${windowSeconds}`);
  const versions = m.versions.map(v => v.model_version);
  const version = params.get('version') || versions[0];
  const q = `window=${windowSeconds}`;
  const enc = encodeURIComponent;
  const [vol, cov, acc, lat, heat, drift, segs, alerts] = await Promise.all([
    api(`/api/models/${enc(id)}/timeseries?metric=prediction_count&${q}`),
    api(`/api/models/${enc(id)}/timeseries?metric=label_coverage&${q}`),
    api(`/api/models/${enc(id)}/timeseries?metric=accuracy,estimated_accuracy&${q}`),
    api(`/api/models/${enc(id)}/timeseries?metric=latency_p50,latency_p95,latency_p99&version=${enc(version)}&${q}`),
    api(`/api/models/${enc(id)}/heatmap?version=${enc(version)}&metric=psi&${q}`),
    api(`/api/models/${enc(id)}/drift?version=${enc(version)}&${q}`),
    api(`/api/models/${enc(id)}/segments?version=${enc(version)}&metric=prediction_count,accuracy,label_coverage&${q}`),
    api(`/api/alerts?model=${enc(id)}&limit=50`),
  ]);
  const accSeries = acc.series.map(s => ({
    name: `${s.model_version} ${s.metric === 'accuracy' ? 'accuracy' : 'estimated'}`,
    dashed: s.metric !== 'accuracy',
    points: s.points.map(p => [p.window_start, p.value]),
  }));
  const accAll = acc.series.filter(s => s.metric === 'accuracy').flatMap(s => s.points);
  const minAcc = accAll.length ? Math.min(...accAll.map(p => p.value)) : null;
  const opts = versions.map(v => `<option ${v === version ? 'selected' : ''}>${esc(v)}</option>`).join('');
  const driftRows = drift.features.map(f => {
    const mm = f.metrics;
    const v = k => (mm[k] ? mm[k].value : null);
    return `<tr data-feature="${esc(f.feature)}"><td>${esc(f.feature)}${f.method === 'weighted_mean' && drift.method === 'mixed' ? ' *' : ''}</td><td class="num">${fmt(v('psi'))}</td><td class="num">${fmt(mm.psi ? mm.psi.max : null)}</td>
      <td class="num">${fmt(v('js_distance'))}</td><td class="num">${fmt(v('ks_statistic') !== null ? v('ks_statistic') : v('chi2_statistic'))}</td>
      <td class="num" data-field="drifted_windows">${f.drifted_windows} / ${f.windows}</td><td class="num">${fmt(v('missing_rate'))}</td></tr>`;
  }).join('');
  const segRows = segs.segments.map(s => {
    const v = k => (s.metrics[k] ? s.metrics[k].value : null);
    return `<tr data-segment="${esc(s.segment)}"><td>${esc(s.segment || 'all traffic')}</td><td class="num">${fmt(v('prediction_count'))}</td>
      <td class="num">${fmt(v('accuracy'))}</td><td class="num">${fmt(v('label_coverage'))}</td></tr>`;
  }).join('');
  el.innerHTML = `<h1>${esc(id)} <span class="badge ${m.status}">${m.status}</span></h1>
    <div class="controls">version <select id="ver">${opts}</select>
      ${versions.length > 1 ? `<a href="#/compare/${enc(id)}?a=${enc(versions[0])}&b=${enc(versions[1])}">compare versions →</a>` : ''}
      <span class="muted">${m.open_alerts} open alerts · lowest accuracy <b data-field="min_accuracy">${fmt(minAcc)}</b></span></div>
    <div class="grid">
      <div class="card"><h2>Accuracy: realised (solid) and estimated before labels (dashed)</h2>${lineChart(accSeries, { id: 'accuracy', yMax: 1 })}</div>
      <div class="card"><h2>Predictions per window</h2>${lineChart(seriesOf(vol, s => s.model_version), { id: 'volume', yMin: 0 })}</div>
      <div class="card"><h2>Label coverage</h2>${lineChart(seriesOf(cov, s => s.model_version), { id: 'coverage', yMin: 0, yMax: 1 })}</div>
      <div class="card"><h2>Inference latency, ms (${esc(version)})</h2>${lineChart(seriesOf(lat, s => s.metric.replace('latency_', '')), { id: 'latency', yMin: 0 })}</div>
    </div>
    <div class="card"><h2>Feature drift (PSI) per window, ${esc(version)}</h2>${heatmap(heat)}</div>
    <div class="grid">
      <div class="card"><h2>Drift per feature over all windows</h2>
        <table data-table="drift"><tr><th>feature</th><th>PSI</th><th>PSI max</th><th>JS</th><th>KS / χ²</th><th>drifted windows</th><th>missing</th></tr>${driftRows}</table>
        <p class="muted">${drift.method === 'weighted_mean' ? 'Range values are samples-weighted means of the per-window values (no stored histograms for these windows: exact for rates, an approximation for drift statistics).' : 'Drift statistics are recomputed from the merged per-window histograms, exactly as over all the range\'s events' + (drift.method === 'mixed' ? '; features marked * lack histograms for some windows and use samples-weighted means of the per-window values.' : '.')} PSI max is the largest single window.</p></div>
      <div class="card"><h2>Segments, ${esc(version)}</h2>
        <table data-table="segments"><tr><th>segment</th><th>predictions</th><th>accuracy</th><th>label coverage</th></tr>${segRows}</table></div>
    </div>
    <div class="card"><h2>Alerts</h2>${alertTable(alerts.alerts)}</div>`;
  document.getElementById('ver').addEventListener('change', e => {
    location.hash = `#/model/${enc(id)}?version=${enc(e.target.value)}`;
  });
}

async function alertsPage(el, params) {
  setNav('alerts');
  const q = new URLSearchParams();
  for (const k of ['model', 'status', 'severity', 'open']) if (params.get(k)) q.set(k, params.get(k));
  q.set('limit', '500');
  const a = await api(`/api/alerts?${q}`);
  const sel = (name, values) => `<select data-filter="${name}"><option value="">${name}: any</option>${values.map(v => `<option ${params.get(name) === v ? 'selected' : ''}>${v}</option>`).join('')}</select>`;
  el.innerHTML = `<h1>Alerts</h1>
    <div class="controls">${sel('status', ['firing', 'resolved'])}${sel('severity', ['warning', 'critical'])}${sel('open', ['true'])}
      <span class="muted" data-field="alert_count">${a.count} alerts</span></div>
    <div class="card">${alertTable(a.alerts)}</div>`;
  el.querySelectorAll('[data-filter]').forEach(s => s.addEventListener('change', () => {
    const p = new URLSearchParams();
    el.querySelectorAll('[data-filter]').forEach(x => { if (x.value) p.set(x.dataset.filter, x.value); });
    location.hash = `#/alerts?${p}`;
  }));
}

async function comparePage(el, id, params) {
  setNav('');
  const enc = encodeURIComponent;
  const m = await api(`/api/models/${enc(id)}`);
  const versions = m.versions.map(v => v.model_version);
  const a = params.get('a') || versions[0], b = params.get('b') || versions[1] || versions[0];
  const [c, acc] = await Promise.all([
    api(`/api/models/${enc(id)}/compare?a=${enc(a)}&b=${enc(b)}&window=${windowSeconds}`),
    api(`/api/models/${enc(id)}/timeseries?metric=accuracy&version=${enc(a)},${enc(b)}&window=${windowSeconds}`),
  ]);
  const rows = c.metrics.map(x => {
    const d = x.difference;
    return `<tr data-metric="${esc(x.metric)}"><td>${esc(x.metric)}</td><td class="num" data-side="a">${fmt(x.a ? x.a.value : null, 4)}</td>
      <td class="num" data-side="b">${fmt(x.b ? x.b.value : null, 4)}</td><td class="num ${d > 0 ? 'pos' : d < 0 ? 'neg' : ''}">${d === null ? '–' : (d > 0 ? '+' : '') + fmt(d, 4)}</td></tr>`;
  }).join('');
  const drows = c.drift.map(x => `<tr><td>${esc(x.feature)}</td><td class="num">${fmt(x.a_psi)}</td><td class="num">${fmt(x.b_psi)}</td>
    <td class="num">${x.a_drifted_windows === undefined ? '–' : x.a_drifted_windows}</td><td class="num">${x.b_drifted_windows === undefined ? '–' : x.b_drifted_windows}</td></tr>`).join('');
  const opt = sel => versions.map(v => `<option ${v === sel ? 'selected' : ''}>${esc(v)}</option>`).join('');
  el.innerHTML = `<h1>${esc(id)}: ${esc(a)} vs ${esc(b)}</h1>
    <div class="controls">A <select id="va">${opt(a)}</select> B <select id="vb">${opt(b)}</select>
      <a href="#/model/${enc(id)}">model page →</a></div>
    <div class="grid">
      <div class="card"><h2>Over all windows</h2><table data-table="compare"><tr><th>metric</th><th>${esc(a)}</th><th>${esc(b)}</th><th>B − A</th></tr>${rows}</table></div>
      <div class="card"><h2>Accuracy per window</h2>${lineChart(seriesOf(acc, s => s.model_version), { id: 'compare-accuracy', yMax: 1 })}</div>
    </div>
    <div class="card"><h2>Drift per feature (PSI, samples-weighted)</h2><table><tr><th>feature</th><th>${esc(a)} PSI</th><th>${esc(b)} PSI</th><th>${esc(a)} drifted windows</th><th>${esc(b)} drifted windows</th></tr>${drows}</table></div>`;
  const go = () => { location.hash = `#/compare/${enc(id)}?a=${enc(document.getElementById('va').value)}&b=${enc(document.getElementById('vb').value)}`; };
  document.getElementById('va').addEventListener('change', go);
  document.getElementById('vb').addEventListener('change', go);
}

async function render() {
  const el = document.getElementById('app');
  const { parts, params } = route();
  const status = document.getElementById('status');
  try {
    if (parts[0] === 'model' && parts[1]) await modelPage(el, parts[1], params);
    else if (parts[0] === 'compare' && parts[1]) await comparePage(el, parts[1], params);
    else if (parts[0] === 'alerts') await alertsPage(el, params);
    else await overview(el);
    status.textContent = `updated ${new Date().toLocaleTimeString()} · refreshes every ${refreshSeconds}s`;
    document.body.dataset.rendered = 'true';
  } catch (e) {
    status.textContent = '';
    el.innerHTML = `<p class="error">Cannot load: ${esc(e.message)}</p>`;
  }
}

async function start() {
  try {
    const c = await api('/api/config');
    refreshSeconds = c.refresh_seconds || 10;
    windowSeconds = c.default_window_seconds || 300;
  } catch (e) { /* defaults */ }
  window.addEventListener('hashchange', render);
  await render();
  timer = setInterval(render, refreshSeconds * 1000);
}
start();
