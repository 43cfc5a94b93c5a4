// The live status page: polls /status every second, pulls new steps from /history?since=N, and draws the charts
// with uPlot (served by the coordinator from node_modules; no network beyond this server). Plain browser script,
// no build step. Every shown number keeps its exact value in data-value (the page test compares it to /status).
'use strict';
(function () {
  const POLL_MS = 1000, POLL_DONE_MS = 5000;
  const hist = { step: [], loss: [], lr: [], gradNorm: [], tokensPerSecond: [] };
  let historyVersion = -1, evals = [], charts = null, lastDrawn = 0;
  const $ = (sel) => document.querySelector(sel);
  const fmt = {
    loss: (v) => v.toFixed(4), evalLoss: (v) => v.toFixed(4), lr: (v) => v.toExponential(3), gradNorm: (v) => v.toFixed(4),
    tokensPerSecond: (v) => v.toFixed(0), bubble: (v) => (100 * v).toFixed(1) + ' %',
  };
  const secs = (s) => {
    if (s === null || s === undefined) return '–';
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${String(m).padStart(2, '0')}m` : m ? `${m}m ${String(r).padStart(2, '0')}s` : `${r}s`;
  };
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function makeChart(id, series, log) {
    const box = document.getElementById(id);
    const opts = {
      width: Math.max(300, box.clientWidth - 4), height: 200,
      scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
      axes: [{ label: 'step', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000] }, { size: 70 }],
      series: [{ label: 'step' }, ...series],
      legend: { show: true },
      hooks: { draw: [() => { document.body.dataset.drawn = String(lastDrawn); }] },
    };
    return new uPlot(opts, [[], ...series.map(() => [])], box);
  }

  function ensureCharts() {
    if (charts) return;
    charts = {
      loss: makeChart('chart-loss', [
        { label: 'train loss', stroke: '#3b82f6', width: 1.5 },
        { label: 'eval loss', stroke: '#ef4444', width: 2, spanGaps: true, points: { show: true, size: 8, fill: '#ef4444' } },
      ]),
      lr: makeChart('chart-lr', [{ label: 'lr', stroke: '#8b5cf6', width: 1.5 }]),
      grad: makeChart('chart-grad', [{ label: 'grad norm', stroke: '#f59e0b', width: 1.5 }]),
      tps: makeChart('chart-tps', [{ label: 'tokens/s', stroke: '#10b981', width: 1.5 }]),
    };
  }

  function drawCharts() {
    ensureCharts();
    // Train and eval losses share the x axis: the union of their steps, null where a series has no point.
    const evalAt = new Map(evals.map((e) => [e.step, e.loss]));
    const trainAt = new Map(hist.step.map((s, i) => [s, hist.loss[i]]));
    const xs = Array.from(new Set([...hist.step, ...evalAt.keys()])).sort((a, b) => a - b);
    lastDrawn = hist.step.length ? hist.step[hist.step.length - 1] : 0;
    charts.loss.setData([xs, xs.map((s) => trainAt.has(s) ? trainAt.get(s) : null), xs.map((s) => evalAt.has(s) ? evalAt.get(s) : null)]);
    charts.lr.setData([hist.step, hist.lr]);
    charts.grad.setData([hist.step, hist.gradNorm]);
    charts.tps.setData([hist.step, hist.tokensPerSecond]);
  }

  function setValue(k, v) {
    const node = document.querySelector(`.value[data-k="${k}"]`);
    if (v === null || v === undefined) { node.textContent = '–'; node.removeAttribute('data-value'); return; }
    node.textContent = fmt[k](v);
    node.dataset.value = String(v);
  }

  function drawTimeline(last) {
    const box = $('#timeline');
    box.replaceChildren();
    if (!last || !last.stageTimings.length) { box.append(el('div', { class: 'muted' }, 'no per-stage timings for this step (one stage in one process, or not reported)')); return; }
    $('#timeline-step').textContent = `(step ${last.step}, ${last.seconds.toFixed(3)} s)`;
    const rows = last.stageTimings.map((t) => {
      let spans = t.spans && t.spans.length ? t.spans : null;
      if (!spans) { // totals only: lay the phases end to end
        let at = 0;
        spans = [['forward', t.forwardSeconds], ['backward', t.backwardSeconds], ['wait', t.idleSeconds], ['allreduce', t.allreduceSeconds]]
          .filter(([, d]) => d > 0).map(([kind, d]) => { const s = { kind, micro: -1, start: at, end: at + d }; at += d; return s; });
      }
      return { t, spans, recorded: !!(t.spans && t.spans.length) };
    });
    const tMax = Math.max(1e-9, ...rows.flatMap((r) => r.spans.map((s) => s.end)));
    const W = Math.max(400, box.clientWidth - 10 || 900), left = 170, rowH = 22, H = rows.length * rowH + 24;
    const NS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('data-tmax', tMax);
    const x = (v) => left + (v / tMax) * (W - left - 10);
    rows.forEach((r, i) => {
      const y = 4 + i * rowH;
      const label = document.createElementNS(NS, 'text');
      label.setAttribute('x', 4); label.setAttribute('y', y + 14); label.setAttribute('font-size', '12');
      label.textContent = `stage ${r.t.stage} · rep ${r.t.replica}${r.recorded ? '' : ' (totals)'}`;
      svg.append(label);
      for (const s of r.spans) {
        const rect = document.createElementNS(NS, 'rect');
        rect.setAttribute('x', x(s.start)); rect.setAttribute('y', y); rect.setAttribute('height', rowH - 6);
        rect.setAttribute('width', Math.max(0.5, x(s.end) - x(s.start)));
        rect.setAttribute('class', `bar ${s.kind}`);
        rect.dataset.kind = s.kind; rect.dataset.stage = r.t.stage; rect.dataset.replica = r.t.replica;
        rect.dataset.start = s.start; rect.dataset.end = s.end; rect.dataset.micro = s.micro;
        const title = document.createElementNS(NS, 'title');
        title.textContent = `${s.kind}${s.micro >= 0 ? ' µb ' + s.micro : ''}: ${(1000 * s.start).toFixed(1)}–${(1000 * s.end).toFixed(1)} ms`;
        rect.append(title);
        svg.append(rect);
      }
    });
    const axis = document.createElementNS(NS, 'text');
    axis.setAttribute('x', W - 10); axis.setAttribute('y', H - 4); axis.setAttribute('font-size', '11'); axis.setAttribute('text-anchor', 'end');
    axis.textContent = `${(1000 * tMax).toFixed(1)} ms`;
    svg.append(axis);
    box.append(svg);
  }

  function drawTables(s) {
    const byKey = new Map((s.lastStep ? s.lastStep.stageTimings : []).map((t) => [`${t.stage}/${t.replica}`, t]));
    const rows = s.workers.length ? s.workers.map((w) => ({ id: w.id, stage: w.stage, replica: w.replica, state: w.state, t: byKey.get(`${w.stage}/${w.replica}`) }))
      : [...byKey.values()].map((t) => ({ id: s.job && s.job.executor === 'in-process' ? 'this process' : '–', stage: t.stage, replica: t.replica, state: s.state, t }));
    if (!rows.length && s.job) rows.push({ id: 'this process', stage: 0, replica: 0, state: s.state, t: undefined });
    const tb = $('#workers tbody');
    tb.replaceChildren(...rows.map((r) => {
      const tr = el('tr');
      tr.append(el('td', {}, r.id), el('td', { class: 'num' }, r.stage), el('td', { class: 'num' }, r.replica), el('td', {}, r.state));
      for (const k of ['forwardSeconds', 'backwardSeconds', 'idleSeconds', 'allreduceSeconds']) tr.append(el('td', { class: 'num' }, r.t ? r.t[k].toFixed(3) : '–'));
      return tr;
    }));
    const c = s.lastCheckpoint;
    $('#checkpoint').textContent = c ? `step ${c.step}: ${c.dir} (${(c.bytes / 1048576).toFixed(2)} MiB, ${c.seconds.toFixed(2)} s)` : 'no checkpoint yet';
    $('#recoveries').replaceChildren(...s.recoveries.map((r) => el('li', {}, `step ${r.step}, attempt ${r.attempt}: ${r.reason} → resumed from ${r.resumeFrom || 'the initial state'}`)));
    $('#answers-section').hidden = s.answers.length === 0;
    $('#answers tbody').replaceChildren(...s.answers.map((a) => {
      const tr = el('tr');
      tr.append(el('td', {}, a.prompt), el('td', {}, a.base || '(empty)'), el('td', {}, a.tuned || '(empty)'));
      return tr;
    }));
  }

  function drawHeader(s) {
    if (s.job) {
      $('#job-name').textContent = s.job.name;
      document.title = `${s.job.name} · ${s.step}/${s.totalSteps} · dqlora`;
      $('#run-facts').textContent = `${s.job.executor === 'workers' ? `${s.job.stages} stage(s) × ${s.job.replicas} replica(s) of workers` : 'one process'} · backend ${s.job.backend} · ${s.job.trainExamples} training / ${s.job.validationExamples} validation examples · ${s.job.outputDir}${s.job.resumedFrom ? ` · resumed from ${s.job.resumedFrom}` : ''}`;
    }
    const badge = $('#run-state');
    badge.textContent = s.state; badge.className = `badge ${s.state}`;
    $('#progress-fill').style.width = s.totalSteps ? `${(100 * s.step) / s.totalSteps}%` : '0';
    const p = $('#progress-text');
    p.textContent = `step ${s.step}/${s.totalSteps}${s.epoch !== null ? ` · epoch ${s.epoch.toFixed(2)}` : ''} · elapsed ${secs(s.elapsedSeconds)} · ETA ${secs(s.etaSeconds)}${s.end && s.end.error ? ` · ${s.end.error}` : ''}`;
    p.dataset.step = s.step; p.dataset.total = s.totalSteps;
    for (const k of ['loss', 'evalLoss', 'lr', 'gradNorm', 'tokensPerSecond', 'bubble']) setValue(k, s[k]);
  }

  async function poll() {
    let s;
    try {
      s = await (await fetch('/status', { cache: 'no-store' })).json();
      if (s.historyVersion !== historyVersion) { for (const k of Object.keys(hist)) hist[k] = []; historyVersion = s.historyVersion; }
      const since = hist.step.length ? hist.step[hist.step.length - 1] : 0;
      if (s.step > since || s.historyVersion !== historyVersion || !charts) {
        const h = await (await fetch(`/history?since=${since}`, { cache: 'no-store' })).json();
        for (const k of Object.keys(hist)) hist[k] = hist[k].concat(h[k]); // (not push(...): a long run's first pull has 100k+ points)
      }
      evals = s.evals;
      $('#conn').textContent = `updated ${new Date().toLocaleTimeString()}`;
      drawHeader(s); drawCharts(); drawTimeline(s.lastStep); drawTables(s);
    } catch (e) {
      $('#conn').textContent = `cannot reach the coordinator (${e.message}); retrying`;
    }
    setTimeout(poll, s && s.state !== 'training' && s.state !== 'waiting' ? POLL_DONE_MS : POLL_MS);
  }
  poll();
})();
