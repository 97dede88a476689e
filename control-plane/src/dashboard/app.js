// Sluice dashboard: speaks the control plane's JSON API (the AdminService and
// StatsService calls as proto3 JSON). Every text that comes from the API is put
// into the page with textContent or text nodes, never parsed as HTML.
'use strict';

(() => {
  const TOKEN_KEY = 'sluice.adminToken';
  const REFRESH_MS = 5000;
  const HOUR = 3600e3;
  const DAY = 24 * HOUR;
  const RANGES = { '24h': DAY, '7d': 7 * DAY, '30d': 30 * DAY };
  const MAX_SERIES = 7;

  // ---------------------------------------------------------------- DOM helpers

  const $ = (selector, root = document) => root.querySelector(selector);

  /** Builds an element; strings and numbers among `children` become text nodes. */
  function h(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  /** The same for SVG elements. */
  function svg(tag, attrs, ...children) {
    return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
  }

  function build(el, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
      else if (name === 'text') el.textContent = String(value);
      else el.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function table(el, headers, rows, emptyText) {
    const head = h('thead', null, h('tr', null, headers.map((c) =>
      h('th', { class: c.num ? 'num' : null }, c.label))));
    const body = h('tbody');
    if (rows.length === 0) {
      body.append(h('tr', null, h('td', { class: 'empty', colspan: headers.length }, emptyText)));
    } else {
      for (const row of rows) body.append(row);
    }
    el.replaceChildren(head, body);
  }

  // ---------------------------------------------------------------- formatting

  const intFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const compactFormat = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });
  const relFormat = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

  /** proto3 JSON writes 64-bit integers as strings and omits zero values. */
  const num = (v) => (v === undefined || v === null || v === '' ? 0 : Number(v));

  const fmtInt = (n) => intFormat.format(Math.round(num(n)));
  const fmtCount = (n, unit) => `${fmtInt(n)} ${unit}`;
  function fmtCost(x) {
    x = num(x);
    // Money too small for four decimals is not shown as none (200 prompt tokens of a cheap
    // model cost 0.00003): three significant digits, as a key's spend is shown.
    if (x > 0 && x < 0.0001) return new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 }).format(x);
    const digits = x === 0 ? 2 : x < 0.01 ? 4 : x < 1 ? 3 : 2;
    return new Intl.NumberFormat(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits }).format(x);
  }
  /** A cost with the currency of the settings: "0.0123 USD". */
  const fmtMoney = (x) => `${fmtCost(x)} ${state.currency}`;
  function fmtMs(ms) {
    ms = num(ms);
    if (ms >= 10000) return `${new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 }).format(ms / 1000)} s`;
    if (ms >= 1000) return `${new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 }).format(ms / 1000)} s`;
    return `${new Intl.NumberFormat(undefined, { maximumFractionDigits: ms < 10 ? 1 : 0 }).format(ms)} ms`;
  }
  /**
   * A latency or time to the first token of the statistics: none known (no streamed request,
   * requests a crash cut off) comes as 0, which no measured one is, and reads as a dash.
   */
  const fmtLatency = (ms) => (num(ms) > 0 ? fmtMs(ms) : '–');
  function fmtPct(ratio) {
    const p = num(ratio) * 100;
    // A rate that rounds to 0 or 100 but is not says so: "0 %" read as no error at all.
    if (p > 0 && p < 0.1) return '<0.1 %';
    if (p < 100 && p > 99.9) return '>99.9 %';
    return `${new Intl.NumberFormat(undefined, { maximumFractionDigits: p > 0 && p < 10 ? 1 : 0 }).format(p)} %`;
  }
  function fmtAxis(v, kind) {
    if (kind === 'ms') return v >= 1000 ? `${compactFormat.format(v / 1000)} s` : `${compactFormat.format(v)} ms`;
    if (kind === 'cost') return v < 1 && v > 0 ? new Intl.NumberFormat(undefined, { maximumSignificantDigits: 2 }).format(v) : compactFormat.format(v);
    return compactFormat.format(v);
  }
  function fmtValue(v, kind) {
    if (kind === 'ms') return fmtMs(v);
    if (kind === 'cost') return fmtMoney(v);
    return fmtInt(v);
  }
  function parseTime(s) {
    if (!s) return null;
    const t = Date.parse(s);
    return Number.isNaN(t) ? null : t;
  }
  /** "3 minutes ago", "in 2 hours". */
  function relTime(t) {
    if (t === null) return '–';
    const secs = Math.round((t - Date.now()) / 1000);
    const abs = Math.abs(secs);
    if (abs < 5) return 'just now';
    if (abs < 60) return relFormat.format(secs, 'second');
    if (abs < 3600) return relFormat.format(Math.round(secs / 60), 'minute');
    if (abs < 86400) return relFormat.format(Math.round(secs / 3600), 'hour');
    return relFormat.format(Math.round(secs / 86400), 'day');
  }
  function fmtDateTime(t) {
    if (t === null) return '–';
    const sameDay = new Date(t).toDateString() === new Date().toDateString();
    return new Date(t).toLocaleString(undefined, sameDay
      ? { hour: '2-digit', minute: '2-digit', second: '2-digit' }
      : { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }
  // Day buckets are UTC days (as the store keeps them): named by their UTC date, which a
  // viewer west of UTC would otherwise see as the day before.
  function fmtBucket(t, step) {
    return new Date(t).toLocaleString(undefined, step >= DAY
      ? { month: 'short', day: 'numeric', timeZone: 'UTC' }
      : { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }
  const poolName = (p) => (p === 'POOL_FALLBACK' ? 'fallback' : p === 'POOL_PRIMARY' ? 'primary' : '–');

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** POST /api/sluice.v1.<service>/<method> with the token as a bearer header. */
  async function call(path, body, token = state.token) {
    let response;
    try {
      response = await fetch(`/api/sluice.v1.${path}`, {
        method: 'POST',
        headers: { 'authorization': `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify(body || {}),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (err) {
      throw new ApiError(0, 'UNAVAILABLE', `cannot reach the control plane (${err.message})`);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const error = new ApiError(response.status, (data && data.code) || 'UNKNOWN',
        (data && data.message) || `HTTP ${response.status}`);
      if (response.status === 401 && token === state.token && state.token) {
        signOut('The admin token is no longer accepted. Sign in again.');
      }
      throw error;
    }
    return data || {};
  }

  // ---------------------------------------------------------------- state

  const state = {
    token: null,
    page: 'overview',
    range: '24h',
    granularity: 'auto',
    split: '',
    backends: [],
    cooldowns: [],
    editing: null, // the backend being edited, or null when adding
    confirming: null, // e.g. "backend:<id>" while its delete asks for confirmation
    timer: null,
    refreshing: false,
    bannerFromLoad: false,
    lastRefresh: null,
    charts: {}, // last drawn chart data, redrawn on resize
    currency: 'USD', // of every cost and price; from the settings
    settings: null, // the settings as last loaded or saved
    settingsDirty: false, // the settings form holds edits not yet saved
  };

  const PAGES = {
    overview: loadOverview,
    backends: loadBackends,
    keys: loadKeys,
    replicas: loadReplicas,
    cooldowns: loadCooldowns,
    settings: loadSettings,
  };

  // ---------------------------------------------------------------- sign-in

  function showSignIn(message) {
    $('#app').hidden = true;
    $('#signin').hidden = false;
    $('#signin-error').textContent = message || '';
    $('#signin-token').focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $('#signin-token');
    const token = input.value.trim();
    const error = $('#signin-error');
    if (!token) {
      error.textContent = 'Enter the admin token.';
      return;
    }
    const button = $('#signin-submit');
    button.disabled = true;
    error.textContent = '';
    try {
      const answer = await call('AdminService/GetSettings', {}, token);
      setCurrency(answer.settings);
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = '';
      showApp();
    } catch (err) {
      error.textContent = err.status === 401
        ? 'Wrong admin token: the control plane did not accept it.'
        : `Could not sign in: ${err.message}`;
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  function signOut(message) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(state.timer);
    state.timer = null;
    $('#key-once-value').value = '';
    $('#key-once').hidden = true;
    closeBackendForm();
    closeKeyForm();
    showSignIn(message);
  }

  function showApp() {
    $('#signin').hidden = true;
    $('#app').hidden = false;
    route();
  }

  // ---------------------------------------------------------------- navigation and refresh

  function route() {
    const page = (location.hash || '#overview').slice(1);
    state.page = PAGES[page] ? page : 'overview';
    state.confirming = null;
    // Coming to the settings page shows the stored settings, not edits left behind.
    if (state.page === 'settings') state.settingsDirty = false;
    for (const section of document.querySelectorAll('.page')) {
      section.hidden = section.id !== `page-${state.page}`;
    }
    for (const link of document.querySelectorAll('#nav a')) {
      if (link.dataset.page === state.page) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    // Charts drawn while the page was hidden or at another width are redrawn at once.
    if (state.page === 'overview') redrawCharts();
    refresh();
  }

  function redrawCharts() {
    for (const [id, data] of Object.entries(state.charts)) drawChart($(`#chart-${id}`), data);
  }

  /** Loads the current page now, then again every few seconds. */
  async function refresh() {
    clearTimeout(state.timer);
    if (!state.token) return;
    if (state.refreshing) {
      state.timer = setTimeout(refresh, 200);
      return;
    }
    state.refreshing = true;
    const page = state.page;
    try {
      await PAGES[page]();
      state.lastRefresh = Date.now();
      // A load's own failure is over; an action's stays until the next action.
      if (state.bannerFromLoad) setBanner('');
    } catch (err) {
      if (err.status !== 401) setBanner(`Could not load ${page}: ${err.message}`, true);
    } finally {
      state.refreshing = false;
      updateRefreshStatus();
      if (state.token) state.timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 4 : REFRESH_MS);
    }
  }

  function updateRefreshStatus() {
    $('#refresh-status').textContent = state.lastRefresh ? `Updated ${relTime(state.lastRefresh)}` : '';
  }

  /** Shows `text` in the banner (or hides it); `fromLoad`: a page load's failure, which the
   *  next successful load clears. */
  function setBanner(text, fromLoad = false) {
    const banner = $('#banner');
    banner.textContent = text;
    banner.hidden = !text;
    state.bannerFromLoad = fromLoad && !!text;
  }

  let noticeTimer = null;
  function notify(text) {
    const notice = $('#notice');
    notice.textContent = text;
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice.hidden = true; }, 4000);
  }

  /** Runs an action from a button; a failure shows in the banner until the next action (the
   *  page reloaded after it does not clear it). */
  async function act(button, action) {
    if (button) button.disabled = true;
    setBanner('');
    try {
      await action();
    } catch (err) {
      if (err.status !== 401) setBanner(err.message);
    } finally {
      if (button) button.disabled = false;
    }
    await refresh();
  }

  // ---------------------------------------------------------------- overview

  function rangeStart() {
    return Date.now() - RANGES[state.range];
  }

  function step() {
    const g = state.granularity === 'auto' ? (state.range === '30d' ? 'day' : 'hour') : state.granularity;
    return g === 'day' ? DAY : HOUR;
  }

  const GROUP_BY = { backend: 'GROUP_BY_BACKEND', model: 'GROUP_BY_MODEL', pool: 'GROUP_BY_POOL' };

  async function loadOverview() {
    const start = rangeStart();
    const startTime = new Date(start).toISOString();
    const bucket = step();
    const usageRequest = {
      startTime,
      granularity: bucket === DAY ? 'GRANULARITY_DAY' : 'GRANULARITY_HOUR',
    };
    if (state.split) usageRequest.groupBy = GROUP_BY[state.split];
    // One grouped query each for the backends' and the pools' tables, whatever their number.
    // The charts' buckets come page by page (a split over many backends passes what one
    // answer holds); if they cannot be read, the totals and tables are shown all the same.
    const [totals, pools, usage, backends, cooldowns] = await Promise.all([
      call('StatsService/GetTotals', { startTime, groupBy: 'GROUP_BY_BACKEND' }),
      call('StatsService/GetTotals', { startTime, groupBy: 'GROUP_BY_POOL' }),
      allBuckets(usageRequest).catch((error) => ({ error })),
      call('AdminService/ListBackends'),
      call('AdminService/ListCooldowns'),
    ]);
    state.backends = backends.backends || [];
    state.cooldowns = cooldowns.cooldowns || [];
    if (state.page !== 'overview') return;
    if (totals.currency) setCurrency({ currency: totals.currency });
    renderTotals(totals);
    renderOverviewBackends(totals.groups || []);
    renderOverviewPools(pools.groups || []);
    renderHoursNote(totals.hoursKeptSince, usage.hoursKeptSince, start, bucket);
    if (usage.error) throw usage.error;
    renderCharts(usage.buckets, start, bucket);
  }

  /**
   * Says what the figures could not count by the hour: before the hourly retention's cutoff
   * usage is kept by the whole UTC day alone, so hour buckets there are empty, and so are the
   * hours of the range's partial first day there (the totals).
   */
  function renderHoursNote(totalsKept, usageKept, start, bucket) {
    const note = $('#hours-note');
    const kept = Date.parse(totalsKept || usageKept || '');
    const reached = Number.isFinite(kept) && start < kept;
    const partialDay = start % DAY !== 0;
    note.hidden = !(reached && (bucket === HOUR || partialDay));
    note.textContent = note.hidden ? '' : `Usage before ${new Date(kept).toISOString().slice(0, 16).replace('T', ' ')} UTC is kept by the whole day only (the hourly retention): `
      + (bucket === HOUR ? 'the hourly charts are empty before it, and ' : '')
      + 'the totals leave out the hours of the range’s first day before it.';
  }

  /** The most buckets one `GetUsage` page holds. */
  const USAGE_PAGE = 5000;

  /** Every bucket of a `GetUsage` query, page by page. */
  async function allBuckets(request) {
    const buckets = [];
    let pageToken = '';
    let hoursKeptSince;
    do {
      const page = await call('StatsService/GetUsage', { ...request, pageSize: USAGE_PAGE, pageToken });
      for (const b of page.buckets || []) buckets.push(b);
      hoursKeptSince = page.hoursKeptSince;
      pageToken = page.nextPageToken || '';
    } while (pageToken);
    return { buckets, hoursKeptSince };
  }

  function renderTotals(t) {
    const card = (label, value, sub) => h('div', { class: 'card stat' },
      h('div', { class: 'label' }, label),
      h('div', { class: 'value' }, value),
      h('div', { class: 'sub' }, sub || '\u00a0'));
    // Requests whose tokens were estimated (a stream its client left, a request a crash cut
    // off), and the parts of the tokens priced apart (read from the cache, written to it,
    // reasoning, audio): each named only where there were some.
    const some = (n, text) => (num(n) > 0 ? text(fmtInt(n)) : '');
    const estimated = some(t.estimatedCount, (n) => ` · ${n} estimated`);
    const prompt = `${fmtInt(t.promptTokens)} prompt`
      + some(t.cachedPromptTokens, (n) => ` (${n} cached)`)
      + some(t.cacheWritePromptTokens, (n) => ` (${n} written to cache)`);
    const completion = `${fmtInt(t.completionTokens)} completion`
      + some(t.reasoningTokens, (n) => ` (${n} reasoning)`);
    const audioText = some(num(t.audioPromptTokens) + num(t.audioCompletionTokens), (n) => ` · ${n} audio`);
    $('#totals').replaceChildren(
      card('Requests', fmtInt(t.requestCount),
        `${fmtInt(t.streamCount)} streamed${estimated} · ${fmtCount(t.backendCount, num(t.backendCount) === 1 ? 'backend' : 'backends')}`),
      card('Error rate', fmtPct(t.errorRate), fmtCount(t.errorCount, num(t.errorCount) === 1 ? 'error' : 'errors')),
      card('Tokens', fmtInt(t.totalTokens), `${prompt} · ${completion}${audioText}`),
      card('Cost', fmtMoney(t.cost), 'from the models\u2019 prices'),
      card('Latency p50', fmtLatency(t.p50LatencyMs), `avg ${fmtLatency(t.avgLatencyMs)}`),
      card('Latency p95', fmtLatency(t.p95LatencyMs), `p99 ${fmtLatency(t.p99LatencyMs)}`),
      card('Time to first token', fmtLatency(t.avgTtftMs), 'average'),
    );
  }

  const METRICS = [
    { id: 'requests', value: (b) => num(b.requestCount), kind: 'count', additive: true },
    { id: 'tokens', value: (b) => num(b.totalTokens), kind: 'count', additive: true },
    { id: 'cost', value: (b) => num(b.cost), kind: 'cost', additive: true },
    // A bucket whose requests have no latency known (a crash cut them off) has no point.
    { id: 'latency', value: (b) => (num(b.p95LatencyMs) > 0 ? num(b.p95LatencyMs) : null), kind: 'ms', additive: false },
  ];

  function renderCharts(buckets, start, bucketStep) {
    const first = Math.floor(start / bucketStep) * bucketStep;
    const last = Math.floor(Date.now() / bucketStep) * bucketStep;
    const times = [];
    for (let t = first; t <= last; t += bucketStep) times.push(t);
    const index = new Map(times.map((t, i) => [t, i]));

    // Group buckets into series; the busiest few are drawn, the rest summed as "other".
    const groups = new Map();
    for (const b of buckets) {
      const key = b.groupKey || '';
      const none = { backend: 'no backend', model: 'no model', pool: 'no pool' }[state.split];
      const label = b.groupLabel || b.groupKey || (state.split ? none || 'none' : 'All requests');
      if (!groups.has(key)) groups.set(key, { label, buckets: [], requests: 0 });
      const g = groups.get(key);
      g.buckets.push(b);
      g.requests += num(b.requestCount);
    }
    const ordered = [...groups.values()].sort((a, b) => b.requests - a.requests);
    const shown = ordered.slice(0, MAX_SERIES);
    const rest = ordered.slice(MAX_SERIES);

    for (const metric of METRICS) {
      const series = shown.map((g, i) => ({ label: g.label, cls: `s${i}`, values: values(g.buckets, metric) }));
      if (rest.length > 0 && metric.additive) {
        series.push({ label: `${rest.length} others`, cls: `s${MAX_SERIES}`, values: values(rest.flatMap((g) => g.buckets), metric) });
      }
      const data = { times, step: bucketStep, series, kind: metric.kind };
      state.charts[metric.id] = data;
      drawChart($(`#chart-${metric.id}`), data);
    }

    function values(list, metric) {
      const out = times.map(() => (metric.additive ? 0 : null));
      for (const b of list) {
        const i = index.get(parseTime(b.startTime));
        if (i === undefined) continue;
        const v = metric.value(b);
        if (v === null) continue;
        out[i] = metric.additive ? out[i] + v : v;
      }
      return out;
    }
  }

  /** A round step for `ticks` gridlines that together reach at least `max`. */
  function niceStep(max, ticks, whole) {
    if (!(max > 0)) return 1;
    const raw = max / ticks;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) {
      const step = m * magnitude;
      if (step >= raw && (!whole || Number.isInteger(step))) return step;
    }
    return whole ? Math.max(1, Math.ceil(raw)) : 10 * magnitude;
  }

  /** A line chart as SVG: one path per series, axes, a tooltip per bucket. */
  function drawChart(container, data) {
    const { times, series, kind } = data;
    const all = series.flatMap((s) => s.values).filter((v) => v !== null);
    if (series.length === 0 || all.every((v) => v === 0)) {
      container.replaceChildren(h('div', { class: 'empty' }, 'No requests in this range yet.'));
      return;
    }
    const width = Math.max(container.clientWidth || 0, 280);
    const height = 200;
    const m = { left: 58, right: 12, top: 10, bottom: 24 };
    const plotW = width - m.left - m.right;
    const plotH = height - m.top - m.bottom;
    const TICKS = 4;
    const tick = niceStep(Math.max(...all), TICKS, kind === 'count');
    const top = tick * TICKS;
    const x = (i) => m.left + (times.length === 1 ? plotW / 2 : (i * plotW) / (times.length - 1));
    const y = (v) => m.top + plotH - (v / top) * plotH;

    const root = svg('svg', {
      viewBox: `0 0 ${width} ${height}`,
      role: 'img',
      'aria-label': `chart of ${series.map((s) => s.label).join(', ')}`,
      class: 'chart-svg',
    });
    const axis = svg('g', { class: 'axis' });
    for (let k = 0; k <= TICKS; k += 1) {
      const v = tick * k;
      axis.append(
        svg('line', { class: k === 0 ? 'base' : 'grid', x1: m.left, x2: width - m.right, y1: y(v), y2: y(v) }),
        svg('text', { x: m.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmtAxis(v, kind)),
      );
    }
    // Room for about one label per 180 px; the first and last align to the plot's edges.
    const labels = Math.min(times.length, Math.max(2, Math.floor(plotW / 180)));
    for (let k = 0; k < labels; k += 1) {
      const i = labels === 1 ? 0 : Math.round((k * (times.length - 1)) / (labels - 1));
      const anchor = times.length === 1 ? 'middle' : k === 0 ? 'start' : k === labels - 1 ? 'end' : 'middle';
      axis.append(svg('text', { x: x(i), y: height - 6, 'text-anchor': anchor }, fmtBucket(times[i], data.step)));
    }
    root.append(axis);

    const showPoints = times.length <= 60;
    series.forEach((s) => {
      let d = '';
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null) {
          pen = false;
          return;
        }
        d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (d) root.append(svg('path', { class: `series ${s.cls}`, d }));
      if (showPoints) {
        s.values.forEach((v, i) => {
          if (v !== null && (v > 0 || times.length === 1)) {
            root.append(svg('circle', { class: `point ${s.cls}`, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5 }));
          }
        });
      }
    });

    // One transparent band per bucket whose <title> lists every series' value.
    const band = times.length === 1 ? plotW : plotW / (times.length - 1);
    times.forEach((t, i) => {
      const lines = [fmtBucket(t, data.step) + (data.step >= DAY ? ' (UTC)' : '')];
      for (const s of series) {
        const v = s.values[i];
        lines.push(`${s.label}: ${v === null ? '–' : fmtValue(v, kind)}`);
      }
      root.append(svg('rect', {
        class: 'hover',
        x: Math.max(m.left, x(i) - band / 2),
        y: m.top,
        width: Math.max(1, Math.min(band, width - m.right - Math.max(m.left, x(i) - band / 2))),
        height: plotH,
      }, svg('title', null, lines.join('\n'))));
    });

    const legend = h('div', { class: 'legend' }, series.map((s) =>
      h('span', null, h('span', { class: `swatch ${s.cls}` }), s.label)));
    container.replaceChildren(root, legend);
  }

  // The backend's own cooldown (for every model), and those of single models at it.
  function cooldownsFor(backendId) {
    const now = Date.now();
    const running = state.cooldowns.filter((c) => c.backendId === backendId && (parseTime(c.until) || 0) > now);
    return { own: running.find((c) => !c.model), models: running.filter((c) => c.model) };
  }

  function stateCell(backend) {
    const { own: cooldown, models } = cooldownsFor(backend.id);
    if (!cooldown && models.length) {
      // One model's limit: the backend serves its other models.
      return h('td', null,
        backend.enabled
          ? h('span', { class: 'pill ok' }, 'enabled')
          : h('span', { class: 'pill off' }, 'disabled'),
        h('span', { class: 'pill warn' }, models.length === 1 ? '1 model cooling down' : `${models.length} models cooling down`),
        models.map((m) => {
          const until = parseTime(m.until);
          return h('span', { class: 'sub-line' }, `${m.model} until ${fmtDateTime(until)} (${relTime(until)})`);
        }));
    }
    if (cooldown) {
      const until = parseTime(cooldown.until);
      const rateLimited = /429|rate/i.test(cooldown.reason || '');
      // A disabled backend says so first: its cooldown runs on, but it takes no request.
      return h('td', null,
        backend.enabled ? null : h('span', { class: 'pill off' }, 'disabled'),
        h('span', { class: 'pill warn' }, rateLimited ? 'rate-limited' : 'cooling down'),
        h('span', { class: 'sub-line' }, `until ${fmtDateTime(until)} (${relTime(until)})`),
        cooldown.reason ? h('span', { class: 'sub-line' }, cooldown.reason) : null);
    }
    return h('td', null, backend.enabled
      ? h('span', { class: 'pill ok' }, 'enabled')
      : h('span', { class: 'pill off' }, 'disabled'));
  }

  function renderOverviewBackends(groups) {
    const byId = new Map(groups.map((g) => [g.groupKey || '', g]));
    const rows = state.backends.map((b) => {
      const t = byId.get(b.id) || {};
      return h('tr', { 'data-backend-id': b.id },
        h('td', { class: 'name' }, b.name),
        h('td', null, poolName(b.pool), h('span', { class: 'sub-line' }, `priority ${b.priority || 0}`)),
        stateCell(b),
        h('td', { class: 'num' }, fmtInt(t.requestCount)),
        h('td', { class: 'num' }, num(t.requestCount) ? fmtPct(t.errorRate) : '–'),
        h('td', { class: 'num' }, fmtLatency(t.p95LatencyMs)),
        h('td', { class: 'num' }, fmtMoney(t.cost)));
    });
    // Usage of backends deleted since (named `NAME (deleted)`) and of requests that reached
    // none: the rows add up to the totals above.
    const current = new Set(state.backends.map((b) => b.id));
    for (const g of groups) {
      if (current.has(g.groupKey || '')) continue;
      rows.push(h('tr', { 'data-backend-id': g.groupKey || 'none' },
        h('td', { class: 'name' }, g.groupLabel || g.groupKey || 'no backend'),
        h('td', null, '–'),
        h('td', null, g.groupKey ? h('span', { class: 'pill off' }, 'deleted') : '–'),
        h('td', { class: 'num' }, fmtInt(g.requestCount)),
        h('td', { class: 'num' }, num(g.requestCount) ? fmtPct(g.errorRate) : '–'),
        h('td', { class: 'num' }, fmtLatency(g.p95LatencyMs)),
        h('td', { class: 'num' }, fmtMoney(g.cost))));
    }
    table($('#overview-backends'), [
      { label: 'Backend' }, { label: 'Pool' }, { label: 'State' },
      { label: 'Requests', num: true }, { label: 'Error rate', num: true },
      { label: 'p95', num: true }, { label: 'Cost', num: true },
    ], rows, 'No backends yet: add one on the Backends page.');
  }

  /** Each pool's totals, with how many backends served it (a pool is the one a backend
   *  had when its requests were counted). */
  function renderOverviewPools(groups) {
    const rows = groups.map((g) => h('tr', { 'data-pool': g.groupKey || 'none' },
      h('td', { class: 'name' }, g.groupKey || 'no backend'),
      h('td', { class: 'num' }, fmtInt(g.backendCount)),
      h('td', { class: 'num' }, fmtInt(g.requestCount)),
      h('td', { class: 'num' }, num(g.requestCount) ? fmtPct(g.errorRate) : '–'),
      h('td', { class: 'num' }, fmtLatency(g.p95LatencyMs)),
      h('td', { class: 'num' }, fmtInt(g.totalTokens)),
      h('td', { class: 'num' }, fmtMoney(g.cost))));
    table($('#overview-pools'), [
      { label: 'Pool' }, { label: 'Backends', num: true }, { label: 'Requests', num: true },
      { label: 'Error rate', num: true }, { label: 'p95', num: true },
      { label: 'Tokens', num: true }, { label: 'Cost', num: true },
    ], rows, 'No requests in this range yet.');
  }

  /** Takes the currency from settings (or an answer carrying one) and labels prices with it. */
  function setCurrency(settings) {
    if (settings && settings.currency) state.currency = settings.currency;
    for (const el of document.querySelectorAll('.currency')) el.textContent = `(${state.currency})`;
  }

  // ---------------------------------------------------------------- backends

  async function loadBackends() {
    const [backends, cooldowns, settings] = await Promise.all([
      call('AdminService/ListBackends'),
      call('AdminService/ListCooldowns'),
      call('AdminService/GetSettings'),
    ]);
    setCurrency(settings.settings);
    state.backends = backends.backends || [];
    state.cooldowns = cooldowns.cooldowns || [];
    if (state.page !== 'backends') return;
    renderBackends();
  }

  function confirmButtons(key, label, onConfirm) {
    if (state.confirming !== key) {
      return [h('button', {
        type: 'button',
        class: 'secondary small',
        'data-action': label.toLowerCase(),
        onclick: () => { state.confirming = key; rerender(); },
      }, label)];
    }
    return [
      h('span', { class: 'muted' }, `${label}? `),
      h('button', {
        type: 'button',
        class: 'danger small',
        'data-action': `confirm-${label.toLowerCase()}`,
        onclick: (e) => { state.confirming = null; act(e.currentTarget, onConfirm); },
      }, `Yes, ${label.toLowerCase()}`),
      h('button', {
        type: 'button',
        class: 'secondary small',
        onclick: () => { state.confirming = null; rerender(); },
      }, 'Cancel'),
    ];
  }

  function rerender() {
    if (state.page === 'backends') renderBackends();
    else if (state.page === 'keys') renderKeys();
  }

  function renderBackends() {
    const rows = state.backends.map((b) => {
      const models = b.models || [];
      return h('tr', { 'data-backend-id': b.id },
        h('td', { class: 'name' }, b.name),
        h('td', { class: 'url' }, h('code', null, b.baseUrl)),
        h('td', { class: 'api' }, apiName(b),
          b.apiFormat === 'API_FORMAT_ANTHROPIC'
            ? h('span', { class: 'sub-line mono' }, b.anthropicVersion || 'SDK\u2019s version')
            : null,
          respondsName(b)),
        h('td', null, poolName(b.pool)),
        h('td', { class: 'num' }, fmtInt(b.priority)),
        h('td', { class: 'num' }, fmtInt(b.weight || 1)),
        h('td', null, models.map((mr) => h('span', { class: 'sub-line mono' },
          mr.upstreamName && mr.upstreamName !== mr.name ? `${mr.name} → ${mr.upstreamName}` : mr.name,
          num(mr.defaultMaxTokens) ? ` (max_tokens ${fmtInt(mr.defaultMaxTokens)})` : '',
          num(mr.maxOutputTokens) ? ` (max output ${fmtInt(mr.maxOutputTokens)})` : ''))),
        h('td', { class: 'num' }, num(b.rpmLimit) ? fmtCount(b.rpmLimit, '/min') : 'none',
          num(b.tpmLimit) ? h('span', { class: 'sub-line' }, fmtCount(b.tpmLimit, 'tok/min')) : null),
        h('td', { class: 'mono' }, b.apiKeyHint ? `••••${b.apiKeyHint}` : 'none'),
        stateCell(b),
        h('td', { class: 'actions' },
          state.confirming === `backend:${b.id}` ? null : [
            h('button', { type: 'button', class: 'secondary small', 'data-action': 'edit', onclick: () => openBackendForm(b) }, 'Edit'),
            h('button', {
              type: 'button',
              class: 'secondary small',
              'data-action': b.enabled ? 'disable' : 'enable',
              onclick: (e) => act(e.currentTarget, async () => {
                await call('AdminService/UpdateBackend', { backend: { id: b.id, enabled: !b.enabled }, updateMask: 'enabled' });
                notify(`${b.enabled ? 'Disabled' : 'Enabled'} ${b.name}.`);
              }),
            }, b.enabled ? 'Disable' : 'Enable'),
          ],
          confirmButtons(`backend:${b.id}`, 'Delete', async () => {
            await call('AdminService/DeleteBackend', { id: b.id });
            notify(`Deleted ${b.name}.`);
          })));
    });
    table($('#backends-table'), [
      { label: 'Name' }, { label: 'Base URL' }, { label: 'API' }, { label: 'Pool' }, { label: 'Priority', num: true },
      { label: 'Weight', num: true }, { label: 'Models' }, { label: 'Limits', num: true },
      { label: 'API key' }, { label: 'State' }, { label: '' },
    ], rows, 'No backends yet. Add one to start routing.');
  }

  /** The API a backend speaks, as the list shows it. */
  function apiName(b) {
    return b.apiFormat === 'API_FORMAT_ANTHROPIC' ? 'Anthropic' : 'OpenAI';
  }

  /** Whether it serves the Responses API, when that is not what its API implies. */
  function respondsName(b) {
    const implied = b.apiFormat !== 'API_FORMAT_ANTHROPIC';
    if (b.responsesApi === undefined || b.responsesApi === null || b.responsesApi === implied) return null;
    return h('span', { class: 'sub-line' }, b.responsesApi ? 'Responses API' : 'no Responses API');
  }

  /** Each model row's route as loaded, for the fields the form does not show. */
  const rowModels = new WeakMap();

  function modelRow(model) {
    const cell = (field, attrs) => h('td', null, h('div', { class: 'field', 'data-field': field },
      h('input', attrs), h('p', { class: 'field-error' })));
    const row = h('tr', { class: 'model-row' },
      cell('name', { name: 'model_name', 'aria-label': 'Public model name', placeholder: 'gpt-4o-mini', spellcheck: 'false' }),
      cell('upstream_name', { name: 'upstream_name', 'aria-label': 'Upstream model name', placeholder: 'same as public', spellcheck: 'false' }),
      cell('input_price_per_mtok', { name: 'input_price', 'aria-label': 'Input price per million tokens', type: 'number', min: '0', step: 'any' }),
      cell('cached_input_price_per_mtok', { name: 'cached_input_price', 'aria-label': 'Price per million prompt tokens read from the cache (empty: the input price)', type: 'number', min: '0', step: 'any', placeholder: 'input price' }),
      cell('cache_write_price_per_mtok', { name: 'cache_write_price', 'aria-label': 'Price per million prompt tokens written to the cache (empty: the input price)', type: 'number', min: '0', step: 'any', placeholder: 'input price' }),
      cell('output_price_per_mtok', { name: 'output_price', 'aria-label': 'Output price per million tokens', type: 'number', min: '0', step: 'any' }),
      cell('default_max_tokens', { name: 'default_max_tokens', 'aria-label': 'Default max_tokens for an Anthropic backend', type: 'number', min: '0', step: '1' }),
      cell('max_output_tokens', { name: 'max_output_tokens', 'aria-label': 'The most output tokens a request translated to or from Anthropic\u2019s format asks for (0: as the client asks)', type: 'number', min: '0', step: '1' }),
      cell('long_context', { name: 'long_context', 'aria-label': 'Long-context band: past ABOVE prompt tokens, the input prices times IN and the output price times OUT, as ABOVE:IN:OUT (empty: none)', placeholder: '272000:2:1.5', spellcheck: 'false' }),
      cell('tier_multipliers', { name: 'tiers', 'aria-label': 'Price tiers: what the prices are multiplied by at each tier the answer reports, as TIER=MULTIPLIER, comma-separated', placeholder: 'priority=2, flex=0.5', spellcheck: 'false' }),
      cell('call_prices', { name: 'call_prices', 'aria-label': 'Call prices: what 1,000 calls of each tool the provider runs cost, as TOOL=PRICE, comma-separated (the tool request: a fee for each request answered)', placeholder: 'web_search=10', spellcheck: 'false' }),
      cell('audio_prices', { name: 'audio_prices', 'aria-label': 'Audio prices per million tokens, of the prompt and of the completion, as IN/OUT (empty, or either left empty: the text prices)', placeholder: '32/64', spellcheck: 'false' }),
      h('td', null, h('button', {
        type: 'button',
        class: 'secondary small',
        'aria-label': 'Remove this model',
        onclick: () => row.remove(),
      }, '×')));
    const input = (name) => row.querySelector(`input[name=${name}]`);
    input('model_name').value = (model && model.name) || '';
    input('upstream_name').value = (model && model.upstreamName) || '';
    input('input_price').value = String(num(model && model.inputPricePerMtok));
    input('cached_input_price').value = model && typeof model.cachedInputPricePerMtok === 'number' ? String(model.cachedInputPricePerMtok) : '';
    input('cache_write_price').value = model && typeof model.cacheWritePricePerMtok === 'number' ? String(model.cacheWritePricePerMtok) : '';
    input('output_price').value = String(num(model && model.outputPricePerMtok));
    input('default_max_tokens').value = String(num(model && model.defaultMaxTokens));
    input('max_output_tokens').value = String(num(model && model.maxOutputTokens));
    input('tiers').value = tiersOf(model).map((t) => `${t.tier}=${t.multiplier}`).join(', ');
    input('call_prices').value = callPricesOf(model).map((c) => `${c.tool}=${c.pricePerThousandCalls}`).join(', ');
    const band = longOf(model);
    input('long_context').value = band ? `${band.abovePromptTokens}:${band.inputMultiplier}:${band.outputMultiplier}` : '';
    const audio = audioOf(model);
    input('audio_prices').value = audio.input === undefined && audio.output === undefined ? '' : `${audio.input ?? ''}/${audio.output ?? ''}`;
    if (model) rowModels.set(row, model);
    $('#bf-models').append(row);
  }

  /** A route's price tiers as loaded (the JSON API leaves out an empty list, and a 0). */
  function tiersOf(model) {
    return ((model && model.tierMultipliers) || []).map((t) => ({ tier: t.tier || '', multiplier: num(t.multiplier) }));
  }

  /** A route's tools' prices as loaded (the JSON API leaves out an empty list, and a 0). */
  function callPricesOf(model) {
    return ((model && model.callPrices) || []).map((c) => ({ tool: c.tool || '', pricePerThousandCalls: num(c.pricePerThousandCalls) }));
  }

  /** A route's audio prices as loaded, each undefined when unset (the text price). */
  function audioOf(model) {
    const price = (p) => (typeof p === 'number' ? p : undefined);
    return { input: price(model && model.audioInputPricePerMtok), output: price(model && model.audioOutputPricePerMtok) };
  }

  /**
   * The audio prices written in a model row, `IN/OUT` (`32/64`; either empty for the text's):
   * { input, output }, each undefined when unset; null when the text is not that.
   */
  function parseAudio(text) {
    const trimmed = text.trim();
    if (trimmed === '') return { input: undefined, output: undefined };
    const parts = trimmed.split('/').map((p) => p.trim());
    if (parts.length !== 2) return null;
    const [input, output] = parts.map((p) => (p === '' ? undefined : Number(p)));
    const ok = (p) => p === undefined || (Number.isFinite(p) && p >= 0 && p <= 1e6);
    return ok(input) && ok(output) ? { input, output } : null;
  }

  /** A route's long-context band as loaded (the JSON API writes its threshold as a string), or null. */
  function longOf(model) {
    const band = model && model.longContext;
    if (!band) return null;
    return { abovePromptTokens: num(band.abovePromptTokens), inputMultiplier: num(band.inputMultiplier), outputMultiplier: num(band.outputMultiplier) };
  }

  /**
   * The long-context band written in a model row, `ABOVE:IN:OUT` (`272000:2:1.5`): null for
   * none (empty), undefined when the text is not that.
   */
  function parseLong(text) {
    const trimmed = text.trim();
    if (trimmed === '') return null;
    const parts = trimmed.split(':').map((p) => p.trim());
    // Number('') is 0: an empty figure (`272000:2:`) is a mistake, not a free output.
    if (parts.length !== 3 || parts.includes('')) return undefined;
    const [above, input, output] = parts.map(Number);
    const multiplier = (m) => Number.isFinite(m) && m >= 0 && m <= 100;
    if (!Number.isInteger(above) || above < 1 || above > 1e9 || !multiplier(input) || !multiplier(output)) return undefined;
    return { abovePromptTokens: above, inputMultiplier: input, outputMultiplier: output };
  }

  /**
   * Names and numbers written in a model row, `priority=2, flex=0.5`: each a name as answers
   * give it and a number from 0 to `most`, as [name, number] pairs; null when the text is not that.
   */
  function parsePairs(text, most) {
    const pairs = [];
    for (const part of text.split(',').map((p) => p.trim()).filter((p) => p !== '')) {
      const match = /^([a-z0-9_-]{1,32})\s*=\s*(\S+)$/.exec(part);
      const number = match ? Number(match[2]) : NaN;
      if (!Number.isFinite(number) || number < 0 || number > most) return null;
      pairs.push([match[1], number]);
    }
    return pairs;
  }

  /**
   * A backend as loaded, in the shape `saveBackend` sends the form's values: what the form
   * showed when it opened, field by field, for a save to tell what the operator changed.
   */
  function backendAsSent(b) {
    const sent = {
      name: b.name,
      baseUrl: (b.baseUrl || '').trim(),
      pool: b.pool === 'POOL_FALLBACK' ? 'POOL_FALLBACK' : 'POOL_PRIMARY',
      priority: num(b.priority),
      weight: num(b.weight) || 1,
      rpmLimit: num(b.rpmLimit),
      tpmLimit: num(b.tpmLimit),
      enabled: Boolean(b.enabled),
      models: (b.models || []).map((m) => ({
        ...m,
        name: (m.name || '').trim(),
        upstreamName: (m.upstreamName || '').trim(),
        inputPricePerMtok: num(m.inputPricePerMtok),
        cachedInputPricePerMtok: typeof m.cachedInputPricePerMtok === 'number' ? m.cachedInputPricePerMtok : undefined,
        cacheWritePricePerMtok: typeof m.cacheWritePricePerMtok === 'number' ? m.cacheWritePricePerMtok : undefined,
        outputPricePerMtok: num(m.outputPricePerMtok),
        defaultMaxTokens: num(m.defaultMaxTokens),
        maxOutputTokens: num(m.maxOutputTokens),
        tierMultipliers: tiersOf(m),
        callPrices: callPricesOf(m),
        longContext: longOf(m),
        audioInputPricePerMtok: audioOf(m).input,
        audioOutputPricePerMtok: audioOf(m).output,
      })),
      apiFormat: b.apiFormat === 'API_FORMAT_ANTHROPIC' ? 'API_FORMAT_ANTHROPIC' : 'API_FORMAT_OPENAI',
      anthropicVersion: (b.anthropicVersion || '').trim(),
      keyHeader: KEY_HEADERS.includes(b.keyHeader) ? b.keyHeader : 'KEY_HEADER_UNSPECIFIED',
      responsesApi: typeof b.responsesApi === 'boolean' ? b.responsesApi : undefined,
    };
    return sent;
  }

  // The headers a backend's API key may go in (unspecified: its API format's own).
  const KEY_HEADERS = ['KEY_HEADER_UNSPECIFIED', 'KEY_HEADER_BEARER', 'KEY_HEADER_X_API_KEY', 'KEY_HEADER_API_KEY'];

  function openBackendForm(backend) {
    const form = $('#backend-form');
    clearErrors(form);
    state.editing = backend || null;
    $('#backend-form-title').textContent = backend ? `Edit ${backend.name}` : 'Add backend';
    $('#bf-name').value = backend ? backend.name : '';
    $('#bf-base-url').value = backend ? backend.baseUrl || '' : '';
    $('#bf-pool').value = backend && backend.pool === 'POOL_FALLBACK' ? 'POOL_FALLBACK' : 'POOL_PRIMARY';
    $('#bf-api-format').value = backend && backend.apiFormat === 'API_FORMAT_ANTHROPIC' ? 'API_FORMAT_ANTHROPIC' : 'API_FORMAT_OPENAI';
    $('#bf-anthropic-version').value = backend ? backend.anthropicVersion || '' : '';
    $('#bf-key-header').value = backend && KEY_HEADERS.includes(backend.keyHeader) ? backend.keyHeader : 'KEY_HEADER_UNSPECIFIED';
    $('#bf-responses-api').value = backend && typeof backend.responsesApi === 'boolean' ? String(backend.responsesApi) : '';
    $('#bf-priority').value = String(backend ? num(backend.priority) : 0);
    $('#bf-weight').value = String(backend ? num(backend.weight) || 1 : 1);
    $('#bf-rpm').value = String(backend ? num(backend.rpmLimit) : 0);
    $('#bf-tpm').value = String(backend ? num(backend.tpmLimit) : 0);
    $('#bf-enabled').checked = backend ? Boolean(backend.enabled) : true;
    $('#bf-api-key').value = '';
    $('#bf-api-key').placeholder = backend
      ? (backend.apiKeyHint ? `unchanged (••••${backend.apiKeyHint})` : 'unchanged (none)')
      : 'the provider\u2019s API key';
    $('#bf-models').replaceChildren();
    const models = backend ? backend.models || [] : [];
    if (models.length === 0) modelRow(null);
    else models.forEach(modelRow);
    form.hidden = false;
    $('#bf-name').focus();
  }

  function closeBackendForm() {
    $('#backend-form').hidden = true;
    $('#bf-api-key').value = '';
    state.editing = null;
  }

  function clearErrors(form) {
    for (const p of form.querySelectorAll('.field-error, .form-error')) p.textContent = '';
    for (const input of form.querySelectorAll('[aria-invalid]')) input.removeAttribute('aria-invalid');
  }

  /** Puts `message` beside the field it names, or at the bottom of the form. */
  function showFieldError(form, field, message, row) {
    let container = null;
    if (row !== undefined) {
      const rowEl = form.querySelectorAll('.model-row')[row];
      if (rowEl) container = rowEl.querySelector(`[data-field="${field}"]`);
    } else if (field) {
      container = form.querySelector(`[data-field="${field}"]`);
    }
    if (!container) {
      form.querySelector('.form-error').textContent = field ? `${field}: ${message}` : message;
      return;
    }
    container.querySelector('.field-error').textContent = message;
    const input = container.querySelector('input, select');
    if (input) {
      input.setAttribute('aria-invalid', 'true');
      input.focus();
    }
  }

  /** Server messages read "<field>: <problem>", e.g. "backend.models[1].name: must not be empty". */
  function showApiError(form, err, prefix) {
    const match = /^([A-Za-z_][\w.\[\]]*): (.*)$/s.exec(err.message || '');
    if (err.code === 'INVALID_ARGUMENT' && match) {
      let field = match[1];
      if (prefix && field.startsWith(prefix)) field = field.slice(prefix.length);
      // `models[0].tier_multipliers[1].tier` is shown at its row's tiers.
      const row = /^(\w+)\[(\d+)\](?:\.(\w+))?(?:\[\d+\](?:\.\w+)?)?$/.exec(field);
      if (row && row[3]) showFieldError(form, row[3], match[2], Number(row[2]));
      else if (row) showFieldError(form, row[1], match[2]);
      else showFieldError(form, field, match[2]);
    } else if (err.code === 'ALREADY_EXISTS') {
      showFieldError(form, 'name', err.message);
    } else {
      showFieldError(form, null, err.message);
    }
  }

  /**
   * Whether the browser holds text in a number or date input that it cannot read as one
   * ('5e', '0,15' in an English locale, half a date): its `value` is then '', which the
   * readers below would take for an empty field, 0 or "never", and save as no limit.
   */
  const unreadable = (input) => Boolean(input.validity && input.validity.badInput);

  /** Reads a whole number from an input, or shows why it cannot. */
  // The proto fields these fill are 32-bit: a larger number was sent as typed and refused by
  // the API with a message naming no field.
  function wholeNumber(form, input, field, min, max = 4294967295) {
    const text = input.value.trim();
    const value = unreadable(input) ? NaN : text === '' ? 0 : Number(text);
    if (!Number.isInteger(value) || value < min || value > max) {
      showFieldError(form, field, `must be a whole number from ${min} to ${max}`);
      return null;
    }
    return value;
  }

  async function saveBackend(event) {
    event.preventDefault();
    const form = $('#backend-form');
    clearErrors(form);
    const priority = wholeNumber(form, $('#bf-priority'), 'priority', -2147483648, 2147483647);
    // 0 would be saved as 1 (the API's unset): to take a backend out, disable it.
    const weight = wholeNumber(form, $('#bf-weight'), 'weight', 1);
    const rpmLimit = wholeNumber(form, $('#bf-rpm'), 'rpm_limit', 0);
    const tpmLimit = wholeNumber(form, $('#bf-tpm'), 'tpm_limit', 0);
    if (priority === null || weight === null || rpmLimit === null || tpmLimit === null) return;
    const models = [];
    let bad = false;
    form.querySelectorAll('.model-row').forEach((row, i) => {
      const input = (name) => row.querySelector(`input[name=${name}]`);
      const price = (name, field, empty) => {
        const el = input(name);
        const text = el.value.trim();
        const value = unreadable(el) ? NaN : text === '' ? empty : Number(text);
        if (value !== undefined && (!Number.isFinite(value) || value < 0)) {
          showFieldError(form, field, 'must be a number ≥ 0', i);
          bad = true;
        }
        return value;
      };
      const inputPrice = price('input_price', 'input_price_per_mtok', 0);
      // Empty: none of its own, cached prompt tokens cost the input price.
      const cachedPrice = price('cached_input_price', 'cached_input_price_per_mtok', undefined);
      // Empty: prompt tokens written to the cache cost the input price.
      const writePrice = price('cache_write_price', 'cache_write_price_per_mtok', undefined);
      const outputPrice = price('output_price', 'output_price_per_mtok', 0);
      // A count of tokens: empty is 0 (the default: none of the route's own).
      const tokens = (name) => {
        const el = input(name);
        const text = el.value.trim();
        const value = unreadable(el) ? NaN : text === '' ? 0 : Number(text);
        if (!Number.isInteger(value) || value < 0 || value > 4294967295) {
          showFieldError(form, name, 'must be a whole number from 0 to 4294967295', i);
          bad = true;
        }
        return value;
      };
      const defaultMaxTokens = tokens('default_max_tokens');
      const maxOutputTokens = tokens('max_output_tokens');
      const longContext = parseLong(input('long_context').value);
      if (longContext === undefined) {
        showFieldError(form, 'long_context', 'write ABOVE:IN:OUT (272000:2:1.5): a whole number of prompt tokens from 1, multipliers from 0 to 100; empty for none', i);
        bad = true;
      }
      const tiers = parsePairs(input('tiers').value, 100);
      if (tiers === null) {
        showFieldError(form, 'tier_multipliers', 'write TIER=MULTIPLIER, comma-separated (priority=2, flex=0.5): a tier in a-z, 0-9, _ and -, a multiplier from 0 to 100', i);
        bad = true;
      }
      const calls = parsePairs(input('call_prices').value, 1e6);
      if (calls === null) {
        showFieldError(form, 'call_prices', 'write TOOL=PRICE, comma-separated (web_search=10): a tool in a-z, 0-9, _ and -, a price per 1,000 calls from 0 to 1000000', i);
        bad = true;
      }
      const audio = parseAudio(input('audio_prices').value);
      if (audio === null) {
        showFieldError(form, 'audio_prices', 'write IN/OUT (32/64): prices per million audio tokens from 0 to 1000000, either empty for the text price; empty for the text prices', i);
        bad = true;
      }
      models.push({
        ...(rowModels.get(row) || {}),
        name: input('model_name').value.trim(),
        upstreamName: input('upstream_name').value.trim(),
        inputPricePerMtok: inputPrice,
        cachedInputPricePerMtok: cachedPrice,
        cacheWritePricePerMtok: writePrice,
        outputPricePerMtok: outputPrice,
        defaultMaxTokens,
        maxOutputTokens,
        tierMultipliers: (tiers || []).map(([tier, multiplier]) => ({ tier, multiplier })),
        callPrices: (calls || []).map(([tool, pricePerThousandCalls]) => ({ tool, pricePerThousandCalls })),
        longContext,
        audioInputPricePerMtok: audio ? audio.input : undefined,
        audioOutputPricePerMtok: audio ? audio.output : undefined,
      });
    });
    if (bad) return;
    const backend = {
      name: $('#bf-name').value,
      baseUrl: $('#bf-base-url').value.trim(),
      pool: $('#bf-pool').value,
      priority,
      weight,
      rpmLimit,
      tpmLimit,
      enabled: $('#bf-enabled').checked,
      models,
      apiFormat: $('#bf-api-format').value,
      anthropicVersion: $('#bf-anthropic-version').value.trim(),
      keyHeader: $('#bf-key-header').value,
    };
    // Unset (the default for its API) unless chosen.
    const responsesApi = $('#bf-responses-api').value;
    if (responsesApi !== '') backend.responsesApi = responsesApi === 'true';
    const apiKey = $('#bf-api-key').value;
    const editing = state.editing;
    // Only what the operator changed from the backend as the form opened is sent, so a save
    // never undoes another admin's change made meanwhile (a backend disabled in an incident).
    let changed = [];
    if (editing) {
      const before = backendAsSent(editing);
      changed = Object.keys(before).filter((field) => JSON.stringify(backend[field]) !== JSON.stringify(before[field]));
      if (changed.length === 0 && !apiKey) {
        notify('Nothing to save: nothing changed.');
        return;
      }
    }
    const button = $('#bf-save');
    button.disabled = true;
    try {
      if (editing) {
        backend.id = editing.id;
        // The routes go whole: written only over the backend as the form opened (its etag),
        // so another admin's price change made meanwhile is refused (409) rather than undone.
        if (changed.includes('models')) backend.etag = editing.etag;
        const request = { backend, updateMask: changed.join(',') };
        // The form holds every field of a route (it ships with this control plane): a price
        // it leaves empty, the operator emptied.
        if (changed.includes('models')) request.clearRouteFields = true;
        if (apiKey) request.apiKey = apiKey;
        await call('AdminService/UpdateBackend', request);
        notify(`Saved ${backend.name.trim()}.`);
      } else {
        await call('AdminService/CreateBackend', { backend, apiKey });
        notify(`Added ${backend.name.trim()}.`);
      }
      closeBackendForm();
      await refresh();
    } catch (err) {
      if (err.status !== 401) showApiError(form, err, 'backend.');
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- client keys

  let keys = [];
  // The keys come a page at a time (at 100,000 keys the whole list is tens of megabytes,
  // and every key's spend is summed for it): the tokens of the pages seen so far, the one
  // shown, and the next page's token ('' on the last page).
  const KEYS_PAGE_SIZE = 100;
  const keyPages = { tokens: [''], index: 0, next: '', showRevoked: false };
  // The key whose edit form is open, as it was when the form opened: a save sends only
  // what the operator changed from it, so it never undoes another admin's change.
  let editingKey = null;

  const NO_PERIOD = 'BUDGET_PERIOD_UNSPECIFIED';

  async function loadKeys() {
    const request = {
      pageSize: KEYS_PAGE_SIZE,
      pageToken: keyPages.tokens[keyPages.index],
      activeOnly: !keyPages.showRevoked,
    };
    const [answer, settings] = await Promise.all([
      call('AdminService/ListClientKeys', request),
      call('AdminService/GetSettings'),
    ]);
    setCurrency(settings.settings);
    keys = answer.clientKeys || [];
    keyPages.next = answer.nextPageToken || '';
    // The keys of this page were revoked (and are left out) or deleted: the page before.
    if (keys.length === 0 && keyPages.index > 0) {
      keyPages.tokens.pop();
      keyPages.index -= 1;
      return loadKeys();
    }
    if (state.page !== 'keys') return;
    renderKeys();
  }

  /** Shows another page of keys: +1 the next, -1 the one before, 0 the first. */
  function turnKeyPage(step) {
    if (step === 0) {
      keyPages.tokens = [''];
      keyPages.index = 0;
    } else if (step > 0 && keyPages.next) {
      keyPages.tokens = keyPages.tokens.slice(0, keyPages.index + 1);
      keyPages.tokens.push(keyPages.next);
      keyPages.index += 1;
    } else if (step < 0 && keyPages.index > 0) {
      keyPages.index -= 1;
    } else {
      return;
    }
    refresh();
  }

  function renderKeyPager() {
    const first = keyPages.index * KEYS_PAGE_SIZE;
    $('#keys-range').textContent = keys.length ? `Keys ${first + 1}–${first + keys.length}, oldest first` : '';
    $('#keys-prev').disabled = keyPages.index === 0;
    $('#keys-next').disabled = !keyPages.next;
    $('#keys-pager').hidden = keyPages.index === 0 && !keyPages.next;
  }

  /** Spend and budgets, small ones included: "0.000014", "12.50". */
  function fmtSpend(x) {
    x = num(x);
    if (x > 0 && x < 1) return new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 }).format(x);
    return fmtCost(x);
  }

  const budgetSpent = (k) => num(k.maxBudget) > 0 && num(k.spend) >= num(k.maxBudget);

  /** The key's spend in its period against its budget, as a bar, with what is left and when it resets. */
  function budgetCell(k) {
    const spend = num(k.spend);
    const budget = num(k.maxBudget);
    if (budget === 0) {
      return h('td', { class: 'budget' },
        h('span', { class: 'spend-text' }, `${fmtSpend(spend)} ${state.currency} spent`),
        h('span', { class: 'sub-line' }, 'no budget'));
    }
    const reset = parseTime(k.budgetResetTime);
    const resets = reset === null ? 'lifetime budget, no reset' : `resets ${relTime(reset)}`;
    return h('td', { class: 'budget' },
      h('meter', {
        class: 'spend',
        min: 0,
        max: budget,
        value: Math.min(spend, budget),
        low: budget * 0.8,
        high: budget * 0.95,
        optimum: 0,
        'aria-label': `Spent ${fmtSpend(spend)} of ${fmtSpend(budget)} ${state.currency}`,
        'data-spend': spend,
        'data-budget': budget,
      }),
      h('span', { class: 'spend-text' }, `${fmtSpend(spend)} / ${fmtSpend(budget)} ${state.currency}`),
      h('span', { class: 'sub-line', title: reset === null ? null : fmtDateTime(reset) },
        budgetSpent(k)
          ? `spent: refused until it resets · ${resets}`
          : `${fmtSpend(k.remainingBudget)} left${num(k.heldByDataPlanes) > 0 ? ` (${fmtSpend(k.heldByDataPlanes)} held by data planes)` : ''} · ${resets}`));
  }

  function limitsCell(k) {
    const limits = [];
    if (num(k.rpmLimit)) limits.push(fmtCount(k.rpmLimit, 'req/min'));
    if (num(k.tpmLimit)) limits.push(fmtCount(k.tpmLimit, 'tok/min'));
    if (num(k.maxParallelRequests)) limits.push(fmtCount(k.maxParallelRequests, 'at once'));
    return h('td', { class: 'num' }, limits.length ? limits.map((l) => h('span', { class: 'line' }, l)) : 'none');
  }

  function expiryCell(k) {
    const at = parseTime(k.expireTime);
    if (at === null) return h('td', null, 'never');
    return h('td', { title: fmtDateTime(at) }, fmtDateTime(at), h('span', { class: 'sub-line' }, relTime(at)));
  }

  function keyState(k) {
    if (k.revoked) {
      return [h('span', { class: 'pill bad' }, 'revoked'), h('span', { class: 'sub-line' }, relTime(parseTime(k.revokeTime)))];
    }
    if (k.expired) return h('span', { class: 'pill bad' }, 'expired');
    if (budgetSpent(k)) return h('span', { class: 'pill warn' }, 'budget spent');
    return h('span', { class: 'pill ok' }, 'active');
  }

  function renderKeys() {
    const sorted = [...keys].sort((a, b) => Number(Boolean(a.revoked)) - Number(Boolean(b.revoked)));
    const rows = sorted.map((k) => {
      const created = parseTime(k.createTime);
      const models = k.allowedModels || [];
      const confirming = state.confirming === `key:${k.id}`;
      return h('tr', { 'data-key-id': k.id },
        h('td', { class: 'name' }, k.name),
        h('td', { class: 'mono' }, k.keyPrefix ? `${k.keyPrefix}…` : '–'),
        h('td', null, models.length ? models.map((m) => h('span', { class: 'sub-line mono' }, m)) : 'all models'),
        limitsCell(k),
        budgetCell(k),
        expiryCell(k),
        h('td', { title: fmtDateTime(created) }, relTime(created)),
        h('td', null, keyState(k)),
        h('td', { class: 'actions' }, k.revoked ? null : [
          confirming ? null : h('button', {
            type: 'button', class: 'secondary small', 'data-action': 'edit', onclick: () => openKeyForm(k),
          }, 'Edit'),
          ...confirmButtons(`key:${k.id}`, 'Revoke', async () => {
            await call('AdminService/RevokeClientKey', { id: k.id });
            notify(`Revoked ${k.name}.`);
          }),
        ]));
    });
    table($('#keys-table'), [
      { label: 'Name' }, { label: 'Key' }, { label: 'Models' }, { label: 'Limits', num: true },
      { label: 'Spend this period' }, { label: 'Expires' }, { label: 'Created' }, { label: 'State' },
      { label: '' },
    ], rows, keyPages.showRevoked ? 'No client keys yet.' : 'No active client keys.');
    renderKeyPager();
  }

  /** A time as a datetime-local input shows it (local time, to the second); '' for none. */
  function localInput(t) {
    if (t === null) return '';
    const d = new Date(t);
    const p = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  /** Reads a datetime-local input as an RFC 3339 time; null when empty (never); undefined after showing why it cannot. */
  function readDateTime(form, input, field) {
    const text = input.value.trim();
    if (text === '' && !unreadable(input)) return null;
    const t = text === '' ? NaN : new Date(text).getTime();
    if (Number.isNaN(t)) {
      showFieldError(form, field, 'must be a date and time');
      return undefined;
    }
    return new Date(t).toISOString();
  }

  /** Reads an amount of money ≥ 0 (empty is 0), or shows why it cannot. */
  function readMoney(form, input, field) {
    const text = input.value.trim();
    const value = unreadable(input) ? NaN : text === '' ? 0 : Number(text);
    if (!Number.isFinite(value) || value < 0) {
      showFieldError(form, field, 'must be a number ≥ 0');
      return null;
    }
    return value;
  }

  /** The settable fields of a key form (create or edit), or null after showing why one cannot be read. */
  function readKeyFields(form, prefix) {
    const maxBudget = readMoney(form, $(`#${prefix}-budget`), 'max_budget');
    if (maxBudget === null) return null;
    const rpmLimit = wholeNumber(form, $(`#${prefix}-rpm`), 'rpm_limit', 0);
    if (rpmLimit === null) return null;
    const tpmLimit = wholeNumber(form, $(`#${prefix}-tpm`), 'tpm_limit', 0);
    if (tpmLimit === null) return null;
    const maxParallelRequests = wholeNumber(form, $(`#${prefix}-parallel`), 'max_parallel_requests', 0);
    if (maxParallelRequests === null) return null;
    const expireTime = readDateTime(form, $(`#${prefix}-expire`), 'expire_time');
    if (expireTime === undefined) return null;
    return { maxBudget, budgetPeriod: $(`#${prefix}-period`).value, rpmLimit, tpmLimit, maxParallelRequests, expireTime };
  }

  function openKeyForm(k) {
    const form = $('#key-edit-form');
    clearErrors(form);
    editingKey = k;
    $('#key-edit-title').textContent = `Edit ${k.name}`;
    $('#ke-budget').value = String(num(k.maxBudget));
    $('#ke-period').value = k.budgetPeriod || NO_PERIOD;
    $('#ke-rpm').value = String(num(k.rpmLimit));
    $('#ke-tpm').value = String(num(k.tpmLimit));
    $('#ke-parallel').value = String(num(k.maxParallelRequests));
    $('#ke-expire').value = localInput(parseTime(k.expireTime));
    form.hidden = false;
    $('#ke-budget').focus();
  }

  function closeKeyForm() {
    $('#key-edit-form').hidden = true;
    editingKey = null;
  }

  async function saveKey(event) {
    event.preventDefault();
    const form = $('#key-edit-form');
    clearErrors(form);
    const k = editingKey;
    if (!k) return;
    const next = readKeyFields(form, 'ke');
    if (next === null) return;
    const second = (t) => (t === null ? null : Math.floor(t / 1000));
    const before = {
      maxBudget: num(k.maxBudget),
      budgetPeriod: k.budgetPeriod || NO_PERIOD,
      rpmLimit: num(k.rpmLimit),
      tpmLimit: num(k.tpmLimit),
      maxParallelRequests: num(k.maxParallelRequests),
    };
    const clientKey = { id: k.id };
    const mask = [];
    for (const field of Object.keys(before)) {
      if (next[field] !== before[field]) {
        clientKey[field] = next[field];
        mask.push(field);
      }
    }
    // An emptied field clears the expiry: named in the mask, absent from the key.
    if (second(parseTime(next.expireTime)) !== second(parseTime(k.expireTime))) {
      if (next.expireTime) clientKey.expireTime = next.expireTime;
      mask.push('expireTime');
    }
    if (mask.length === 0) {
      notify('Nothing to save: no field changed.');
      return;
    }
    const button = $('#ke-save');
    button.disabled = true;
    try {
      await call('AdminService/UpdateClientKey', { clientKey, updateMask: mask.join(',') });
      notify(`Saved ${k.name}; data planes apply it with their next snapshot.`);
      closeKeyForm();
      await refresh();
    } catch (err) {
      if (err.status !== 401) showApiError(form, err, 'client_key.');
    } finally {
      button.disabled = false;
    }
  }

  async function createKey(event) {
    event.preventDefault();
    const form = $('#key-form');
    clearErrors(form);
    const fields = readKeyFields(form, 'kf');
    if (fields === null) return;
    const allowedModels = $('#kf-models').value.split(/[\s,]+/).filter(Boolean);
    const request = { name: $('#kf-name').value, allowedModels, ...fields };
    if (request.expireTime === null) delete request.expireTime;
    const button = $('#kf-create');
    button.disabled = true;
    try {
      const answer = await call('AdminService/CreateClientKey', request);
      $('#key-once-value').value = answer.key || '';
      $('#key-once-status').textContent = `Key for ${answer.clientKey ? answer.clientKey.name : ''}`;
      $('#key-once').hidden = false;
      form.reset();
      $('#key-once-value').select();
      await refresh();
    } catch (err) {
      if (err.status !== 401) showApiError(form, err, '');
    } finally {
      button.disabled = false;
    }
  }

  async function copyKey() {
    const input = $('#key-once-value');
    const status = $('#key-once-status');
    try {
      await navigator.clipboard.writeText(input.value);
      status.textContent = 'Copied to the clipboard.';
    } catch (_) {
      input.select();
      status.textContent = 'Press Ctrl+C (⌘C) to copy the selected key.';
    }
  }

  function forgetKey() {
    $('#key-once-value').value = '';
    $('#key-once-status').textContent = '';
    $('#key-once').hidden = true;
  }

  // ---------------------------------------------------------------- replicas

  async function loadReplicas() {
    const answer = await call('AdminService/ListDataPlanes');
    if (state.page !== 'replicas') return;
    const rows = (answer.dataPlanes || []).map((d) => {
      const acked = num(d.ackedVersion);
      const latest = num(d.latestVersion);
      const current = acked >= latest;
      const seen = parseTime(d.lastSeenTime);
      const since = parseTime(d.connectTime);
      return h('tr', null,
        h('td', { class: 'name' }, d.nodeId, d.buildVersion ? h('span', { class: 'sub-line' }, `build ${d.buildVersion}`) : null),
        h('td', null, d.hostname || '–', d.peerAddress ? h('span', { class: 'sub-line mono' }, d.peerAddress) : null),
        h('td', null, d.connected
          ? h('span', { class: 'pill ok' }, 'connected')
          : h('span', { class: 'pill off' }, 'disconnected')),
        h('td', null,
          h('span', { class: current ? 'pill ok' : 'pill warn' }, current ? 'current' : `behind by ${fmtInt(latest - acked)}`),
          h('span', { class: 'sub-line' }, `v${fmtInt(acked)} of v${fmtInt(latest)}`),
          d.lastError ? h('span', { class: 'sub-line' }, `rejected: ${d.lastError}`) : null),
        h('td', { title: fmtDateTime(since) }, relTime(since)),
        h('td', { title: fmtDateTime(seen) }, relTime(seen)));
    });
    table($('#replicas-table'), [
      { label: 'Node' }, { label: 'Host' }, { label: 'Stream' }, { label: 'Snapshot' },
      { label: 'Connected' }, { label: 'Last seen' },
    ], rows, 'No data plane has connected yet.');
  }

  // ---------------------------------------------------------------- cooldowns

  async function loadCooldowns() {
    const answer = await call('AdminService/ListCooldowns');
    if (state.page !== 'cooldowns') return;
    const rows = (answer.cooldowns || []).map((c) => {
      const until = parseTime(c.until);
      const since = parseTime(c.createTime);
      return h('tr', null,
        h('td', { class: 'name' }, c.backendName || c.backendId),
        h('td', null, c.model || h('span', { class: 'muted' }, 'every model')),
        h('td', null, fmtDateTime(until), h('span', { class: 'sub-line' }, relTime(until))),
        h('td', null, c.reason || '–'),
        h('td', { class: 'num' }, fmtInt(c.consecutiveFailures)),
        h('td', null, c.reportedBy || '–'),
        h('td', { title: fmtDateTime(since) }, relTime(since)),
        h('td', { class: 'actions' }, h('button', {
          type: 'button',
          class: 'secondary small',
          'data-action': 'reset',
          onclick: (e) => act(e.currentTarget, async () => {
            await call('AdminService/ResetCooldown', { backendId: c.backendId, model: c.model || '' });
            notify(c.model
              ? `Reset the cooldown of ${c.model} at ${c.backendName || c.backendId}.`
              : `Reset the cooldown of ${c.backendName || c.backendId}.`);
          }),
        }, 'Reset')));
    });
    table($('#cooldowns-table'), [
      { label: 'Backend' }, { label: 'Model' }, { label: 'Until' }, { label: 'Why' }, { label: 'Failures', num: true },
      { label: 'Reported by' }, { label: 'Since' }, { label: '' },
    ], rows, 'No backend is cooling down.');
  }


  // ---------------------------------------------------------------- settings

  // The form's fields: proto field name, input id, kind. Server errors name the proto field
  // ("settings.cooldown_cap: …"), which is each field's data-field.
  const SETTINGS_FIELDS = [
    ['max_attempts', 'maxAttempts', 'int'],
    ['retry_on_rate_limit', 'retryOnRateLimit', 'bool'],
    ['retry_on_server_error', 'retryOnServerError', 'bool'],
    ['retry_on_connect_error', 'retryOnConnectError', 'bool'],
    ['retry_on_timeout', 'retryOnTimeout', 'bool'],
    ['connect_timeout', 'connectTimeout', 'seconds'],
    ['first_byte_timeout', 'firstByteTimeout', 'seconds'],
    ['answer_timeout', 'answerTimeout', 'seconds'],
    ['idle_stream_timeout', 'idleStreamTimeout', 'seconds'],
    ['request_timeout', 'requestTimeout', 'seconds'],
    ['stream_timeout', 'streamTimeout', 'seconds'],
    ['cooldown_base', 'cooldownBase', 'seconds'],
    ['cooldown_cap', 'cooldownCap', 'seconds'],
    ['failure_threshold', 'failureThreshold', 'int'],
    ['usage_retention_days', 'usageRetentionDays', 'int'],
    ['usage_daily_retention_days', 'usageDailyRetentionDays', 'int'],
    ['currency', 'currency', 'text'],
    ['expose_backend_header', 'exposeBackendHeader', 'bool'],
  ];

  const settingsInput = (field) => $(`#sf-${field.replace(/_/g, '-')}`);

  /** proto3 JSON durations are strings of seconds: "5s", "0.500s". */
  const durationSeconds = (d) => (d ? Number(String(d).replace(/s$/, '')) : 0);

  async function loadSettings() {
    const answer = await call('AdminService/GetSettings');
    if (state.page !== 'settings') return;
    setCurrency(answer.settings);
    // A refresh never overwrites what the operator is typing.
    if (!state.settingsDirty) fillSettings(answer.settings || {});
  }

  function fillSettings(settings) {
    state.settings = settings;
    state.settingsDirty = false;
    clearErrors($('#settings-form'));
    for (const [field, json, kind] of SETTINGS_FIELDS) {
      const input = settingsInput(field);
      if (kind === 'bool') input.checked = Boolean(settings[json]);
      else if (kind === 'seconds') input.value = String(durationSeconds(settings[json]));
      else if (kind === 'int') input.value = String(num(settings[json]));
      else input.value = settings[json] || '';
    }
  }

  /** The form's values as proto3 JSON, or null after showing why one cannot be read. */
  function readSettings(form) {
    const out = {};
    for (const [field, json, kind] of SETTINGS_FIELDS) {
      const input = settingsInput(field);
      if (kind === 'bool') {
        out[json] = input.checked;
      } else if (kind === 'int') {
        const value = wholeNumber(form, input, field, 0);
        if (value === null) return null;
        out[json] = value;
      } else if (kind === 'seconds') {
        const text = input.value.trim();
        const value = Number(text);
        if (text === '' || !Number.isFinite(value) || value < 0) {
          showFieldError(form, field, 'must be a number of seconds');
          return null;
        }
        // Whole milliseconds, as proto3 JSON writes them.
        out[json] = `${Number(value.toFixed(3))}s`;
      } else {
        out[json] = input.value.trim();
      }
    }
    return out;
  }

  async function saveSettings(event) {
    event.preventDefault();
    const form = $('#settings-form');
    clearErrors(form);
    const next = readSettings(form);
    if (next === null) return;
    const before = state.settings || {};
    // Only what changed is sent, so a save never undoes another admin's change elsewhere.
    const changed = SETTINGS_FIELDS.filter(([, json, kind]) => {
      if (kind === 'seconds') return durationSeconds(next[json]) !== durationSeconds(before[json]);
      if (kind === 'int') return next[json] !== num(before[json]);
      if (kind === 'bool') return next[json] !== Boolean(before[json]);
      return next[json] !== (before[json] || '');
    }).map(([, json]) => json);
    if (changed.length === 0) {
      notify('Nothing to save: no setting changed.');
      return;
    }
    const button = $('#sf-save');
    button.disabled = true;
    try {
      const answer = await call('AdminService/UpdateSettings', { settings: next, updateMask: changed.join(',') });
      fillSettings(answer.settings || {});
      setCurrency(answer.settings);
      notify('Saved the settings; data planes apply them with their next snapshot.');
    } catch (err) {
      if (err.status !== 401) showApiError(form, err, 'settings.');
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- wiring

  function setRange(range) {
    state.range = range;
    for (const b of document.querySelectorAll('#range button')) {
      b.setAttribute('aria-pressed', String(b.dataset.range === range));
    }
  }

  /** Puts a copy of the key fields' template in each form that holds a place for it. */
  function instantiateKeyLimits() {
    const template = $('#key-limits');
    for (const place of document.querySelectorAll('.key-limits[data-prefix]')) {
      const copy = template.content.cloneNode(true);
      for (const el of copy.querySelectorAll('[id^="P-"]')) el.id = `${place.dataset.prefix}-${el.id.slice(2)}`;
      for (const el of copy.querySelectorAll('label[for^="P-"]')) el.htmlFor = `${place.dataset.prefix}-${el.htmlFor.slice(2)}`;
      place.append(copy);
    }
  }

  function init() {
    instantiateKeyLimits();
    $('#signin-form').addEventListener('submit', signIn);
    $('#signout').addEventListener('click', () => signOut(''));
    window.addEventListener('hashchange', () => { if (state.token) route(); });

    setRange(state.range);
    for (const b of document.querySelectorAll('#range button')) {
      b.addEventListener('click', () => { setRange(b.dataset.range); refresh(); });
    }
    $('#granularity').addEventListener('change', (e) => { state.granularity = e.target.value; refresh(); });
    $('#split').addEventListener('change', (e) => { state.split = e.target.value; refresh(); });

    $('#backend-add').addEventListener('click', () => openBackendForm(null));
    $('#bf-cancel').addEventListener('click', closeBackendForm);
    $('#bf-add-model').addEventListener('click', () => modelRow(null));
    $('#backend-form').addEventListener('submit', saveBackend);

    $('#key-form').addEventListener('submit', createKey);
    $('#key-edit-form').addEventListener('submit', saveKey);
    $('#ke-cancel').addEventListener('click', closeKeyForm);
    $('#keys-prev').addEventListener('click', () => turnKeyPage(-1));
    $('#keys-next').addEventListener('click', () => turnKeyPage(1));
    $('#keys-revoked').addEventListener('change', (e) => {
      keyPages.showRevoked = e.target.checked;
      turnKeyPage(0);
    });
    $('#settings-form').addEventListener('submit', saveSettings);
    // Once the operator is in the form, refreshes leave it alone.
    for (const type of ['input', 'focusin']) {
      $('#settings-form').addEventListener(type, () => { state.settingsDirty = true; });
    }
    $('#sf-revert').addEventListener('click', () => { if (state.settings) fillSettings(state.settings); });
    $('#key-once-copy').addEventListener('click', copyKey);
    $('#key-once-done').addEventListener('click', forgetKey);

    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { if (state.page === 'overview') redrawCharts(); }, 150);
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden && state.token) refresh(); });
    setInterval(updateRefreshStatus, 1000);

    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (state.token) showApp();
    else showSignIn('');
  }

  init();
})();
