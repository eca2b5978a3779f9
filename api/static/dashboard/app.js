// The RouteT2I dashboard: reads the JSON API, renders with DOM nodes (user text only ever as text nodes).
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const JOBS_SHOWN = 25;
  const DECISIONS_SHOWN = 15;
  const BUCKETS = { minute: 60, hour: 48, day: 30 };

  const state = {
    key: sessionStorage.getItem("routet2i.apiKey") || "",
    images: new Map(), // image URL -> object URL (images never change once stored)
    prompts: new Map(), // job id -> prompt
    selected: null,
    timer: null,
    busy: false,
    tiers: ["edge", "cloud"], // the deployment's tiers, cheapest first, once GET /v1/stats has answered
  };

  // ---- helpers ------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  class ApiFailure extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.field = error.field;
    }
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (state.key) h.Authorization = `Bearer ${state.key}`;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) throw new ApiFailure(response.status, body);
    return body;
  }

  // Images go through fetch (not a bare <img src>) so that the API key travels with them.
  async function loadImage(img, url) {
    if (state.images.has(url)) {
      img.src = state.images.get(url);
      return;
    }
    const response = await fetch(url, { headers: headers({ Accept: "image/png" }) });
    if (!response.ok) throw new ApiFailure(response.status, null);
    const objectUrl = URL.createObjectURL(await response.blob());
    state.images.set(url, objectUrl);
    img.src = objectUrl;
  }

  function image(url, alt, cls) {
    const img = el("img", { alt, class: cls });
    loadImage(img, url).catch(() => img.replaceWith(el("span", { class: "muted" }, "image unavailable")));
    return img;
  }

  const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
  const usd = (v) => `$${Number(v || 0).toFixed(4)}`;
  const secs = (v) => (v === null || v === undefined ? "–" : v < 1 ? `${(v * 1000).toFixed(0)} ms` : `${v.toFixed(2)} s`);
  const num = (v, digits) => (typeof v === "number" ? v.toFixed(digits === undefined ? 3 : digits) : String(v));
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const clock = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  const day = (iso) => new Date(iso).toLocaleDateString([], { month: "short", day: "numeric" });
  const badge = (text, kind) => el("span", { class: `badge ${kind || text || "none"}` }, text || "–");

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 120) return `${seconds.toFixed(1)} s`;
    if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  // ---- summary --------------------------------------------------------------------------------------

  function card(title, value, detail) {
    return el("div", { class: "card" }, el("div", { class: "card-title" }, title), el("div", { class: "card-value" }, value), el("div", { class: "muted" }, detail));
  }

  // The cloud spend limit's period, when one is set: "· cloud this period $x of $y".
  function spendLimit(budget) {
    if (budget.spend_limit_usd == null) return "";
    const spent = budget.spent_this_period_usd == null ? "unknown" : usd(budget.spent_this_period_usd);
    return ` · cloud this period ${spent} of ${usd(budget.spend_limit_usd)}`;
  }

  // The deployment's tiers, cheapest first (GET /v1/stats lists them); the first and last keep the edge and
  // cloud colours, the others share a third.
  const tierClass = (tier) => (tier === state.tiers[0] ? "edge" : tier === state.tiers[state.tiers.length - 1] ? "cloud" : "mid");
  const perTier = (values, format) => state.tiers.map((t) => `${t} ${format(values[t] || 0)}`).join(" · ");

  async function loadSummary() {
    const s = await api("/v1/stats");
    state.tiers = s.tiers;
    const routed = s.routed;
    const over = routed.cloud_fraction > s.budget.cloud_fraction;
    const above = routed.total - (routed.by_tier[state.tiers[0]] || 0);
    const breakers = Object.entries(s.breakers || {}).filter(([, b]) => b.state !== "closed").map(([t, b]) => `${t} breaker ${b.state}`);
    document.getElementById("summary").replaceChildren(
      card("Jobs", String(s.jobs.total), Object.entries(s.jobs.by_status).map(([k, v]) => `${k} ${v}`).join(" · ")),
      card("Cloud share", pct(routed.cloud_fraction), `budget ${pct(s.budget.cloud_fraction)} · ${above} of ${routed.total} routed${over ? " · above budget" : ""}${breakers.length ? ` · ${breakers.join(" · ")}` : ""}`),
      card("Spend", usd(s.spend_usd.total), `${perTier(s.spend_usd.by_tier, usd)}${spendLimit(s.budget)}`),
      card("GPU time", `${num(s.gpu_seconds.total, 1)} s`, perTier(s.gpu_seconds.by_tier, (v) => `${num(v, 1)} s`)),
      card("Latency", secs(s.latency_s.p50), `p90 ${secs(s.latency_s.p90)} over ${s.latency_s.count} jobs`),
      card("Router", s.router, `budget window ${s.budget.window} decisions${s.scope ? ` · showing ${s.scope}` : ""}`)
    );
  }

  // ---- queues ---------------------------------------------------------------------------------------

  async function loadQueues() {
    const body = document.querySelector("#queues tbody");
    let q;
    try {
      q = await api("/v1/queues");
    } catch (error) {
      if (error.status !== 403) throw error;
      body.replaceChildren(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "Queues cover every tenant: they are shown to admin keys only.")));
      return;
    }
    body.replaceChildren(
      ...q.items.map((item) => el("tr", {}, el("td", {}, item.name), el("td", { class: "num" }, String(item.depth)), el("td", { class: "num" }, String(item.waiting_jobs)), el("td", { class: "num" }, age(item.oldest_age_s))))
    );
  }

  // ---- charts ---------------------------------------------------------------------------------------

  async function loadCharts() {
    const bucket = document.getElementById("bucket").value;
    const t = await api(`/v1/stats/timeseries?bucket=${encodeURIComponent(bucket)}&buckets=${BUCKETS[bucket]}`);
    const labels = t.items.map((b) => (bucket === "day" ? day(b.start) : clock(b.start)));
    RouteCharts.line(document.getElementById("chart-cloud-fraction"), {
      labels,
      yMax: 1,
      yFormat: (v) => `${Math.round(v * 100)}%`,
      series: [
        { name: "cloud share", values: t.items.map((b) => b.cloud_fraction), cls: "cloud" },
        { name: "budget", values: t.items.map(() => t.budget.cloud_fraction), cls: "budget", dashed: true },
      ],
    });
    RouteCharts.bars(document.getElementById("chart-routed"), {
      labels,
      yFormat: (v) => String(Math.round(v)),
      stacks: t.tiers.map((tier) => ({ name: tier, values: t.items.map((b) => b.routed[tier] || 0), cls: tierClass(tier) })),
    });
    const running = Object.fromEntries(t.tiers.map((tier) => [tier, 0]));
    const lines = Object.fromEntries(t.tiers.map((tier) => [tier, []]));
    const total = [];
    for (const b of t.items) {
      for (const tier of t.tiers) {
        running[tier] += b.spend_usd[tier] || 0;
        lines[tier].push(running[tier]);
      }
      total.push(t.spend_before_usd + Object.values(running).reduce((a, v) => a + v, 0));
    }
    RouteCharts.line(document.getElementById("chart-spend"), {
      labels,
      yFormat: (v) => `$${v < 1 ? v.toFixed(3) : v.toFixed(2)}`,
      series: [
        { name: "total (all time)", values: total, cls: "total" },
        ...t.tiers.map((tier) => ({ name: `${tier} (this window)`, values: lines[tier], cls: tierClass(tier) })),
      ],
    });
  }

  // ---- jobs -----------------------------------------------------------------------------------------

  function jobRow(job) {
    const thumb = job.status === "succeeded" ? image(`${job.url}/image`, `image of job ${job.id}`, "thumb") : el("span", { class: "thumb placeholder" }, ["failed", "cancelled", "expired"].includes(job.status) ? "✕" : "…");
    return el(
      "tr",
      { class: `job${state.selected === job.id ? " selected" : ""}`, "data-job-id": job.id, tabindex: "0", onclick: () => selectJob(job.id), onkeydown: (e) => e.key === "Enter" && selectJob(job.id) },
      el("td", {}, thumb),
      el("td", { class: "prompt" }, job.prompt),
      el("td", {}, badge(job.status)),
      el("td", {}, badge(job.tier)),
      el("td", {}, when(job.created_at)),
      el("td", { class: "num" }, secs(job.timings.total_s))
    );
  }

  async function loadJobs() {
    const page = await api(`/v1/jobs?limit=${JOBS_SHOWN}`);
    for (const job of page.items) state.prompts.set(job.id, job.prompt);
    document.querySelector("#jobs tbody").replaceChildren(...page.items.map(jobRow));
    document.getElementById("jobs-empty").hidden = page.items.length > 0;
  }

  // ---- decision audit ---------------------------------------------------------------------------------

  const valuesOf = (tier) => (tier && typeof tier === "object" ? tier.values || tier : {});

  // Every tier's predicted quality per metric, cheapest first, and the dearest's gap over the cheapest.
  function predictedTable(predicted) {
    if (!predicted || typeof predicted !== "object") return null;
    const tiers = state.tiers.filter((t) => t in predicted).concat(Object.keys(predicted).filter((t) => !state.tiers.includes(t)));
    if (tiers.length < 2) return null;
    const values = Object.fromEntries(tiers.map((t) => [t, valuesOf(predicted[t])]));
    const metrics = [...new Set(tiers.flatMap((t) => Object.keys(values[t])))];
    if (!metrics.length) return null;
    const [low, high] = [tiers[0], tiers[tiers.length - 1]];
    const bar = (v, cls) => el("span", { class: "meter" }, el("span", { class: `fill ${cls}`, style: null, "data-width": v }), el("span", { class: "meter-text" }, num(v)));
    const table = el(
      "table",
      { class: "predicted" },
      el("thead", {}, el("tr", {}, el("th", {}, "metric"), ...tiers.map((t) => el("th", {}, `${t} (predicted)`)), el("th", {}, `${high} − ${low}`))),
      el(
        "tbody",
        {},
        metrics.map((m) => {
          const e = values[low][m];
          const c = values[high][m];
          const gap = typeof e === "number" && typeof c === "number" ? c - e : null;
          return el("tr", {}, el("td", {}, m), ...tiers.map((t) => el("td", {}, bar(values[t][m], tierClass(t)))), el("td", { class: `num ${gap > 0 ? "up" : gap < 0 ? "down" : ""}` }, gap === null ? "–" : (gap > 0 ? "+" : "") + gap.toFixed(3)));
        })
      )
    );
    // Widths are set through the CSSOM: the page's policy forbids inline style attributes.
    table.querySelectorAll(".fill").forEach((node) => {
      const v = Number(node.getAttribute("data-width"));
      node.style.width = `${Math.max(0, Math.min(1, Number.isFinite(v) ? v : 0)) * 100}%`;
    });
    return table;
  }

  // Accepts the shapes a router may use for per-metric tokens: a list of strings, of [token, weight] pairs,
  // of {token|text|word, weight|score|contribution|value} objects, or a {token: weight} mapping.
  function tokensOf(items) {
    if (Array.isArray(items)) {
      return items.map((item) => {
        if (typeof item === "string") return { token: item, weight: null };
        if (Array.isArray(item)) return { token: String(item[0]), weight: typeof item[1] === "number" ? item[1] : null };
        if (item && typeof item === "object") {
          const weight = [item.push, item.weight, item.score, item.contribution, item.value].find((v) => typeof v === "number");
          return { token: String(item.token ?? item.text ?? item.word ?? JSON.stringify(item)), weight: weight ?? null };
        }
        return { token: String(item), weight: null };
      });
    }
    if (items && typeof items === "object") {
      if (Array.isArray(items.tokens)) return tokensOf(items.tokens);
      const entries = Object.entries(items);
      if (entries.length && entries.every(([, v]) => typeof v === "number")) return entries.map(([token, weight]) => ({ token, weight }));
    }
    return null;
  }

  function explanationView(explanation) {
    if (!explanation || typeof explanation !== "object") return null;
    const perMetric = explanation.tokens_by_metric || explanation.per_metric || explanation.metrics || explanation;
    const rows = [];
    for (const [metric, items] of Object.entries(perMetric)) {
      const tokens = tokensOf(items);
      if (!tokens) continue;
      rows.push(
        el(
          "div",
          { class: "explain-row" },
          el("span", { class: "metric" }, metric),
          el(
            "span",
            { class: "tokens" },
            tokens.map((t) => el("span", { class: `token ${t.weight > 0 ? "up" : t.weight < 0 ? "down" : ""}`, title: t.weight === null ? "" : `weight ${t.weight}` }, t.token, t.weight === null ? null : el("small", {}, num(t.weight, 2))))
          )
        )
      );
    }
    const near = explanation.neighbours_gap;
    const nearEntries = near && typeof near === "object" ? Object.entries(near).filter(([, v]) => typeof v === "number") : [];
    const nearRow = nearEntries.length
      ? el(
          "p",
          { class: "explain-neighbours", title: "part of the predicted cloud-minus-edge gap taken from the most similar training prompts" },
          "Similar training prompts: ",
          nearEntries.map(([metric, gap]) => `${metric} ${gap >= 0 ? "+" : ""}${num(gap, 2)}`).join(", ")
        )
      : null;
    return el("div", { class: "explanation" }, el("h4", {}, "Tokens that drove each metric"), rows.length ? rows : el("pre", {}, JSON.stringify(explanation, null, 2)), nearRow);
  }

  function decisionView(d, prompt) {
    const inputs = Object.entries(d.inputs || {}).map(([k, v]) => el("span", { class: "kv" }, `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`));
    const details = [predictedTable(d.predicted), explanationView(d.explanation)].filter(Boolean);
    return el(
      "article",
      { class: "decision", "data-decision-id": d.id, "data-job-id": d.job_id },
      el(
        "div",
        { class: "decision-head" },
        badge(d.tier),
        el("strong", {}, d.router_version && d.router_version !== d.router ? `${d.router} (${d.router_version})` : d.router),
        el("span", {}, `score ${num(d.score)}${d.threshold === null ? "" : ` vs threshold ${num(d.threshold)}`}`),
        el("span", {}, `budget ${pct(d.budget)}`),
        d.shadow ? badge("shadow", "shadow") : null,
        el("span", { class: "muted" }, when(d.created_at))
      ),
      prompt === undefined ? null : el("p", { class: "prompt" }, prompt),
      el("p", { class: "reason" }, d.reason),
      inputs.length ? el("div", { class: "inputs" }, inputs) : null,
      details.length ? details : el("p", { class: "muted" }, "This router records no per-metric prediction.")
    );
  }

  async function promptOf(jobId, jobUrl) {
    if (!state.prompts.has(jobId)) state.prompts.set(jobId, (await api(jobUrl)).prompt);
    return state.prompts.get(jobId);
  }

  async function loadDecisions() {
    const page = await api(`/v1/decisions?limit=${DECISIONS_SHOWN}`);
    const prompts = await Promise.all(page.items.map((d) => promptOf(d.job_id, d.job_url).catch(() => undefined)));
    const box = document.getElementById("decisions");
    box.replaceChildren(...page.items.map((d, i) => decisionView(d, prompts[i])));
    if (!page.items.length) box.append(el("p", { class: "muted" }, "No decisions yet."));
  }

  // ---- job detail -------------------------------------------------------------------------------------

  function jobDetail(job) {
    const events = el("ol", { class: "events" }, (job.events || []).map((e) => el("li", {}, badge(e.status), ` ${when(e.at)}`, e.detail ? el("small", { class: "muted" }, ` ${JSON.stringify(e.detail)}`) : null)));
    const timings = el("dl", { class: "timings" }, Object.entries(job.timings).flatMap(([k, v]) => [el("dt", {}, k.replace(/_s$/, "").replace("_", " ")), el("dd", {}, secs(v))]));
    const result = job.result
      ? el(
          "div",
          { class: "result" },
          image(job.result.image_url, `image of job ${job.id}`, "full"),
          el("p", {}, `${job.result.model_id} on ${job.result.device} · ${job.result.width}×${job.result.height}, ${job.result.steps} steps · seed ${job.result.seed}`),
          el("p", {}, `cost ${usd(job.result.cost_usd)} · ${num(job.result.gpu_s, 2)} GPU-s · generated in ${secs(job.result.wall_s)}`),
          job.result.quality && job.result.quality.values ? el("div", { class: "inputs" }, Object.entries(job.result.quality.values).map(([k, v]) => el("span", { class: "kv" }, `${k}: ${num(v)}`))) : null
        )
      : null;
    const escalated = (job.events || []).find((e) => e.detail && e.detail.stage === "escalated");
    const escalation = escalated && escalated.detail.escalation;
    return [
      el("p", { class: "prompt big" }, job.prompt),
      el("p", {}, badge(job.status), " ", badge(job.tier), job.error ? el("span", { class: "error" }, ` ${job.error}`) : null),
      escalation ? el("p", { class: "escalation" }, badge("escalated", "escalated"), ` edge image replaced by the cloud's: ${escalation.reason}`) : null,
      el("div", { class: "detail-grid" }, result, el("div", {}, el("h3", {}, "Timings"), timings, el("h3", {}, "History"), events)),
      el("h3", {}, "Routing decision"),
      job.decision ? decisionView(job.decision) : el("p", { class: "muted" }, "Not routed yet."),
    ].filter(Boolean);
  }

  async function loadSelected() {
    if (!state.selected) return;
    const job = await api(`/v1/jobs/${encodeURIComponent(state.selected)}`);
    document.getElementById("job-detail-id").textContent = job.id;
    document.getElementById("job-detail-body").replaceChildren(...jobDetail(job));
    document.getElementById("job-detail").hidden = false;
  }

  function selectJob(id) {
    state.selected = id;
    document.querySelectorAll("#jobs tr.job").forEach((row) => row.classList.toggle("selected", row.dataset.jobId === id));
    loadSelected().catch(report);
    document.getElementById("job-detail").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // ---- evaluation plots -------------------------------------------------------------------------------

  async function loadReports() {
    const box = document.getElementById("reports");
    let list;
    try {
      list = await api("/v1/reports");
    } catch (error) {
      if (error.status !== 403) throw error;
      box.replaceChildren(el("p", { class: "muted placeholder-text" }, "Evaluation plots cover the whole deployment: they are shown to admin keys only."));
      return;
    }
    if (!list.items.length) {
      box.replaceChildren(
        el("p", { class: "muted placeholder-text" }, "No evaluation plots yet. Plots are the PNG files in the reports directory (ROUTET2I_REPORTS_DIR), for example written by routet2i eval --suite or routet2i eval --plot.")
      );
      return;
    }
    box.replaceChildren(
      el("div", { class: "plots" }, list.items.map((r) => el("figure", { class: "plot" }, image(r.url, r.name, "plot-img"), el("figcaption", {}, `${r.name} · ${when(r.modified_at)}`))))
    );
  }

  // ---- submit -------------------------------------------------------------------------------------

  async function submit(event) {
    event.preventDefault();
    const out = document.getElementById("submit-result");
    const body = { prompt: document.getElementById("prompt").value };
    for (const field of ["seed", "steps"]) {
      const raw = document.getElementById(field).value.trim();
      if (raw !== "") body[field] = Number(raw);
    }
    const button = document.getElementById("submit-button");
    button.disabled = true;
    try {
      const accepted = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      out.className = "ok";
      out.replaceChildren("Job ", el("code", {}, accepted.id), ` accepted (${accepted.status}).`);
      document.getElementById("prompt").value = "";
      state.selected = accepted.id;
      await refresh();
    } catch (error) {
      out.className = "error";
      out.textContent = `Not accepted: ${error.message}`;
    } finally {
      button.disabled = false;
    }
  }

  // ---- refresh loop -------------------------------------------------------------------------------------

  function report(error) {
    const line = document.getElementById("status-line");
    line.className = "error";
    line.textContent = error.status === 401 || error.status === 403 ? `The API refused the request (${error.status}): enter an API key.` : `Could not load: ${error.message}`;
  }

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const results = await Promise.allSettled([loadSummary(), loadQueues(), loadCharts(), loadJobs(), loadDecisions(), loadReports(), loadSelected()]);
      const failed = results.find((r) => r.status === "rejected");
      if (failed) report(failed.reason);
      else {
        const line = document.getElementById("status-line");
        line.className = "muted";
        line.textContent = `updated ${new Date().toLocaleTimeString()}`;
      }
      document.body.dataset.loaded = "true";
    } finally {
      state.busy = false;
    }
  }

  function schedule() {
    clearInterval(state.timer);
    if (document.getElementById("auto-refresh").checked) state.timer = setInterval(refresh, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const key = document.getElementById("api-key");
    key.value = state.key;
    key.addEventListener("change", () => {
      state.key = key.value.trim();
      sessionStorage.setItem("routet2i.apiKey", state.key);
      refresh();
    });
    document.getElementById("refresh").addEventListener("click", refresh);
    document.getElementById("auto-refresh").addEventListener("change", schedule);
    document.getElementById("bucket").addEventListener("change", () => loadCharts().catch(report));
    document.getElementById("submit-form").addEventListener("submit", submit);
    document.getElementById("job-detail-close").addEventListener("click", () => {
      state.selected = null;
      document.getElementById("job-detail").hidden = true;
      document.querySelectorAll("#jobs tr.selected").forEach((row) => row.classList.remove("selected"));
    });
    refresh();
    schedule();
  });
})();
