"use strict";
// The completion viewer. Everything shown comes from /api/traces[/{id}] and is untrusted
// (model responses, printed output): it is only ever set as text (textContent, text nodes),
// never parsed as HTML. Positions are set through the CSSOM (element.style), which the
// Content-Security-Policy allows, unlike style attributes in markup.

const POLL_MS = 1000;
const FINAL_SOURCES = {
  final: "FINAL(…) in the response",
  final_var: "FINAL_VAR(…): a REPL variable",
  out_of_turns: "out of turns: the model was asked for an answer",
};
let timer = null;
let shown = null; // the route on screen, so a poll does not replace a newer page

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    else if (key === "href" || key === "title" || key === "id" || key === "hidden") node[key] = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ms(value) {
  if (value === null || value === undefined) return "-";
  if (value < 10) return value.toFixed(2) + " ms";
  if (value < 1000) return Math.round(value) + " ms";
  if (value < 60000) return (value / 1000).toFixed(2) + " s";
  return Math.floor(value / 60000) + "m" + ((value % 60000) / 1000).toFixed(1) + "s";
}

function usd(value) {
  if (value === null || value === undefined) return "-";
  return "$" + (value < 1 ? value.toFixed(6) : value.toFixed(2));
}

function badge(status) {
  return el("span", { class: "badge " + status }, status);
}

function pre(text, cls) {
  return el("pre", { class: cls || "text" }, text === null || text === undefined ? "" : text);
}

function table(headers, rows, cls) {
  return el(
    "table",
    { class: cls || "grid" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
  );
}

async function fetchJson(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    location.href = "/login";
    throw new Error("unauthenticated");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// -- the list ------------------------------------------------------------------------------

function renderList(data) {
  document.getElementById("where").textContent = "store: " + data.store;
  if (!data.traces.length) {
    return el("p", { class: "dim" }, "No completions recorded yet (RLM_TRACE_STORE).");
  }
  const rows = data.traces.map((t) => [
    el("a", { href: "#/trace/" + t.trace_id, class: "mono" }, t.trace_id.slice(0, 16)),
    badge(t.status),
    new Date(t.start).toLocaleString(),
    t.root_model || t.name,
    ms(t.duration_ms),
    String(t.span_count),
    t.input_tokens + " → " + t.output_tokens,
    usd(t.cost_usd),
    t.final_source || "-",
    String(t.iterations ?? "-"),
    String(t.error_count),
  ]);
  const headers = ["trace", "status", "start", "model", "duration", "spans", "tokens",
    "cost", "final", "turns", "errors"];
  return el("section", {}, el("h1", {}, "Completions"), table(headers, rows, "grid list"));
}

// -- one completion -------------------------------------------------------------------------

function renderTotals(view) {
  const models = view.totals.models.map((m) => [
    m.model, String(m.calls), String(m.input_tokens), String(m.output_tokens), usd(m.cost_usd),
    String(m.retries), String(m.errors),
  ]);
  const work = view.totals.work.map((w) => [
    w.kind, String(w.count), ms(w.summed_ms), ms(w.wall_ms),
  ]);
  return el(
    "section",
    { id: "totals" },
    el("h2", {}, "Totals"),
    el(
      "div",
      { class: "columns" },
      el("div", {}, el("h3", {}, "Per model"), table(
        ["model", "calls", "input tokens", "output tokens", "cost", "retries", "errors"],
        models, "grid totals-models")),
      el("div", {}, el("h3", {}, "Time per kind of work"), table(
        ["kind", "spans", "summed", "wall (at least one running)"], work, "grid totals-work")),
    ),
  );
}

function renderTimeline(view) {
  const total = Math.max(view.duration_ms, 0.001);
  const legend = el("div", { class: "legend" }, view.processes.map((name, i) =>
    el("span", { class: "proc p" + (i % 8) }, name)));
  legend.append(el("span", { class: "crit-key" }, "critical path"));
  const axis = el("div", { class: "row axis" }, el("div", { class: "label" }, ""),
    el("div", { class: "track" }, [0, 0.25, 0.5, 0.75, 1].map((f) => {
      const tick = el("span", { class: "tick" }, ms(total * f));
      tick.style.left = (f * 100) + "%";
      return tick;
    })));
  const rows = view.spans.map((s) => {
    const label = el("div", { class: "label", title: view.processes[s.process] },
      el("span", { class: "name" }, s.name),
      s.model ? el("span", { class: "dim" }, " " + s.model) : null);
    label.style.paddingLeft = (4 + 12 * s.depth) + "px";
    const bar = el("div", {
      class: "bar p" + (s.process % 8) + (s.critical ? " critical" : "") + (s.error ? " failed" : ""),
      title: s.name + " · " + ms(s.duration_ms) + " at +" + ms(s.start_ms) +
        (s.error ? " · " + s.error : ""),
      data: { spanId: s.span_id, name: s.name, kind: s.kind, startMs: s.start_ms,
        durationMs: s.duration_ms },
    });
    bar.style.left = (100 * s.start_ms / total).toFixed(4) + "%";
    bar.style.width = Math.max(100 * s.duration_ms / total, 0.15).toFixed(4) + "%";
    const time = el("span", { class: "when" }, ms(s.duration_ms));
    return el("div", { class: "row kind-" + s.kind + (s.error ? " failed" : "") }, label,
      el("div", { class: "track" }, bar), time);
  });
  return el("section", { id: "timeline" }, el("h2", {}, "Timeline"), legend,
    el("div", { class: "waterfall" }, axis, rows));
}

function renderCall(call, index) {
  return el("tr", { class: "sub-call", data: { spanId: call.span_id } },
    el("td", {}, String(index + 1)),
    el("td", {}, call.model || "-"),
    el("td", {}, "+" + ms(call.start_ms)),
    el("td", {}, ms(call.duration_ms)),
    el("td", {}, call.input_tokens + " → " + call.output_tokens),
    el("td", {}, usd(call.cost_usd)),
    el("td", {}, String(call.attempts)),
    el("td", {}, call.prompt === null ? el("span", { class: "dim" }, "not recorded")
      : pre(call.prompt, "preview")),
    el("td", {}, call.error ? el("span", { class: "error" }, call.error)
      : call.completion === null ? el("span", { class: "dim" }, "not recorded")
        : pre(call.completion, "preview")));
}

function renderBlock(block) {
  const head = el("div", { class: "block-head" },
    "block " + block.block + " · " + ms(block.duration_ms) + " at +" + ms(block.start_ms) + " · ",
    badge(block.status || "?"));
  const parts = [head];
  parts.push(el("h4", {}, "code"), block.code === null
    ? el("p", { class: "dim" }, "not recorded (RLM_TRACE_CONTENT)") : pre(block.code, "code"));
  parts.push(el("h4", {}, "output"), block.output === null
    ? el("p", { class: "dim" }, "not recorded") : pre(block.output, "output"));
  if (block.error) parts.push(el("p", { class: "error" }, block.error));
  if (block.sub_calls.length) {
    parts.push(el("h4", {}, block.sub_calls.length + " sub-calls"), el("table", { class: "grid calls" },
      el("thead", {}, el("tr", {}, ["#", "model", "start", "latency", "tokens", "cost",
        "attempts", "prompt", "answer"].map((h) => el("th", {}, h)))),
      el("tbody", {}, block.sub_calls.map(renderCall))));
  }
  if (block.child_completions.length) {
    parts.push(el("p", {}, "child RLMs: ", block.child_completions.map((id) => {
      const link = el("button", { class: "link mono", type: "button" }, id);
      link.addEventListener("click", () =>
        document.getElementById("completion-" + id)?.scrollIntoView());
      return link;
    })));
  }
  return el("div", { class: "block", data: { spanId: block.span_id } }, parts);
}

function renderTurn(turn) {
  const responses = turn.calls.map((call) => el("div", { class: "response" },
    el("h4", {}, "response of " + (call.model || "the root model") + " · " + ms(call.duration_ms) +
      " · " + call.input_tokens + " → " + call.output_tokens + " tokens" +
      (call.attempts > 1 ? " · " + call.attempts + " attempts" : "")),
    call.error ? el("p", { class: "error" }, call.error)
      : call.completion === null ? el("p", { class: "dim" }, "not recorded (RLM_TRACE_CONTENT)")
        : pre(call.completion, "response-text")));
  return el("article", { class: "turn", data: { iteration: turn.iteration } },
    el("h3", {}, "Turn " + turn.iteration + " · " + ms(turn.duration_ms) + " at +" + ms(turn.start_ms)),
    turn.error ? el("p", { class: "error" }, turn.error) : null,
    responses, turn.blocks.map(renderBlock));
}

function renderCompletion(c, index) {
  const title = index === 0 ? "Completion" : "Child RLM (depth " + c.depth + ")";
  const how = c.final_source ? (FINAL_SOURCES[c.final_source] || c.final_source) : null;
  const answer = el("div", { class: "answer" },
    el("h4", {}, "final answer" + (how ? " · " + how : "") +
      (c.iterations ? " · after " + c.iterations + " turn(s)" : "")),
    c.error ? el("p", { class: "error" }, c.error) : null,
    c.answer === null ? el("p", { class: "dim" }, c.final_source ? "not recorded" : "none yet")
      : pre(c.answer, "answer-text"));
  return el("section", { class: "completion", id: "completion-" + c.span_id,
    data: { depth: c.depth } },
  el("h2", {}, title + " · " + (c.model || "") + " · " + ms(c.duration_ms)),
  c.turns.map(renderTurn), answer);
}

function renderTrace(view) {
  const s = view.summary || {};
  const head = el("section", { class: "head" },
    el("h1", {}, "Completion ", el("span", { class: "mono" }, view.trace_id), " ", badge(view.status)),
    el("p", {}, ms(view.duration_ms) + " · " + (s.span_count || 0) + " spans · " +
      (s.input_tokens || 0) + " → " + (s.output_tokens || 0) + " tokens · " + usd(s.cost_usd) +
      " · " + (s.services || []).join(", ")),
    s.error_count ? el("p", { class: "error" }, s.error_count + " span(s) failed: marked red below") : null,
    view.content_recorded ? null : el("p", { class: "dim" },
      "Prompts, code and output were not recorded: set RLM_TRACE_CONTENT=1 where it runs."),
    view.status === "running" ? el("p", { class: "live" }, "running: this page updates every second") : null);
  document.getElementById("where").textContent = "";
  return el("div", { id: "trace" }, head, renderTotals(view), renderTimeline(view),
    view.completions.map(renderCompletion));
}

// -- routing and polling --------------------------------------------------------------------

async function show() {
  const route = location.hash.replace(/^#/, "") || "/";
  const match = route.match(/^\/trace\/([0-9a-f]+)$/);
  if (!match && route !== "/") return;
  clearTimeout(timer);
  shown = route;
  const main = document.getElementById("main");
  try {
    if (match) {
      const view = await fetchJson("/api/traces/" + match[1]);
      if (shown !== route) return;
      main.replaceChildren(renderTrace(view));
      document.body.dataset.ready = view.status;
      if (view.status === "running") timer = setTimeout(show, POLL_MS);
    } else if (route === "/") {
      const data = await fetchJson("/api/traces");
      if (shown !== route) return;
      main.replaceChildren(renderList(data));
      document.body.dataset.ready = "list";
      timer = setTimeout(show, 3 * POLL_MS);
    }
  } catch (error) {
    main.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
    timer = setTimeout(show, 3 * POLL_MS);
  }
}

window.addEventListener("hashchange", show);
show();
