// lmarch playground: chat over /v1/chat/completions (streamed, with token probabilities),
// attention maps from /v1/attention, nearest lines from /v1/embeddings. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, embedModel: null, messages: [], busy: false, abort: null, attention: null };

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

function setStatus(text) { $("status").textContent = text; }

// ---- chat ----------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : role === "assistant" ? "Model" : role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text || "";
  div.append(label, body);
  $("conversation").append(div);
  $("conversation").scrollTop = $("conversation").scrollHeight;
  return body;
}

function shade(p) {
  // likelier tokens lighter: the eye goes to the surprising ones
  const alpha = Math.max(0, Math.min(0.55, (1 - p) * 0.55));
  return `rgba(255, 170, 60, ${alpha.toFixed(3)})`;
}

function tokenSpan(entry) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = entry.token;
  const p = Math.exp(entry.logprob);
  span.style.background = shade(p);
  span.dataset.prob = p.toFixed(4);
  span.addEventListener("mouseenter", (ev) => showTooltip(ev, entry));
  span.addEventListener("mousemove", moveTooltip);
  span.addEventListener("mouseleave", hideTooltip);
  return span;
}

function visible(text) {
  return JSON.stringify(text).slice(1, -1);
}

function showTooltip(ev, entry) {
  const tip = $("tooltip");
  const rows = (entry.top_logprobs || []).map((alt) => {
    const chosen = alt.token === entry.token ? " class=\"chosen\"" : "";
    return `<tr${chosen}><td>${escapeHtml(visible(alt.token))}</td><td>${(100 * Math.exp(alt.logprob)).toFixed(1)}%</td></tr>`;
  });
  tip.innerHTML =
    `<div>token <b>${escapeHtml(visible(entry.token))}</b>: p = ${Math.exp(entry.logprob).toFixed(3)}</div>` +
    (rows.length ? `<table class="alternatives">${rows.join("")}</table>` : "");
  tip.hidden = false;
  moveTooltip(ev);
}

function moveTooltip(ev) {
  const tip = $("tooltip");
  tip.style.left = ev.clientX + 12 + "px";
  tip.style.top = ev.clientY + 14 + "px";
}

function hideTooltip() { $("tooltip").hidden = true; }

function escapeHtml(text) {
  return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function samplingBody() {
  const body = {
    model: state.model,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    stream: true,
    logprobs: true,
    top_logprobs: Math.max(0, Math.min(20, parseInt($("top-logprobs").value, 10) || 0)),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  state.busy = true;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("show-attention").disabled = true;
  addMessage("user", text);
  state.messages.push({ role: "user", content: text });
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
  const target = addMessage("assistant", "");
  target.parentElement.classList.add("streaming");
  let reply = "";
  let tokens = 0;
  state.abort = new AbortController();
  setStatus("generating…");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify({ ...samplingBody(), messages }),
      signal: state.abort.signal,
    });
    if (!response.ok) {
      const data = await response.json();
      throw new Error(data.error ? data.error.message : response.statusText);
    }
    let finish = null;
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const entries = choice.logprobs && choice.logprobs.content;
      if (entries) {
        for (const entry of entries) { target.append(tokenSpan(entry)); tokens += 1; }
      }
      if (choice.delta && choice.delta.content) reply += choice.delta.content;
      if (choice.finish_reason) finish = choice.finish_reason;
      $("conversation").scrollTop = $("conversation").scrollHeight;
    }
    state.messages.push({ role: "assistant", content: reply });
    setStatus(`done: ${tokens} tokens (${finish || "stopped"})`);
    $("show-attention").disabled = false;
  } catch (err) {
    if (err.name === "AbortError") {
      state.messages.push({ role: "assistant", content: reply });
      setStatus("stopped");
      $("show-attention").disabled = reply === "";
    } else {
      state.messages.pop();
      target.parentElement.classList.add("error");
      target.textContent = "error: " + err.message;
      setStatus("error");
    }
  } finally {
    target.parentElement.classList.remove("streaming");
    target.dataset.text = reply;
    state.busy = false;
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// ---- attention -----------------------------------------------------------------------------

function conversationForAttention() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.messages);
}

async function loadAttention() {
  const layer = parseInt($("attn-layer").value || "0", 10);
  const head = parseInt($("attn-head").value || "0", 10);
  $("attn-info").textContent = "computing…";
  try {
    const data = await api("/v1/attention", { messages: conversationForAttention(), layer, head });
    state.attention = data;
    fillSelect($("attn-layer"), data.n_layers, data.layer);
    fillSelect($("attn-head"), data.n_heads, data.head);
    $("attention").hidden = false;
    $("attn-info").textContent = `${data.tokens.length} tokens; layer ${data.layer + 1} of ${data.n_layers}, head ${data.head + 1} of ${data.n_heads}`;
    drawStrip(data, data.tokens.length - 1);
    drawMatrix(data);
  } catch (err) {
    $("attention").hidden = false;
    $("attn-info").textContent = "error: " + err.message;
  }
}

function fillSelect(select, n, chosen) {
  if (select.options.length !== n) {
    select.innerHTML = "";
    for (let i = 0; i < n; i++) {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = String(i + 1);  // shown 1-based, as in the info line
      select.append(option);
    }
  }
  select.value = String(chosen);
}

function drawStrip(data, query) {
  const strip = $("attn-strip");
  strip.innerHTML = "";
  const row = data.weights[query];
  const top = Math.max(...row.slice(0, query + 1), 1e-9);
  data.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.textContent = token;
    const w = i <= query ? row[i] : 0;
    span.style.background = `rgba(47, 95, 208, ${(0.85 * w / top).toFixed(3)})`;
    span.title = `${visible(data.tokens[query])} -> ${visible(token)}: ${w.toFixed(4)}`;
    if (i === query) span.className = "query";
    span.addEventListener("click", () => drawStrip(data, i));
    strip.append(span);
  });
}

function drawMatrix(data) {
  const canvas = $("attn-canvas");
  const n = data.tokens.length;
  const cell = Math.max(1, Math.floor(480 / n));
  canvas.width = canvas.height = cell * n;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < n; q++) {
    const row = data.weights[q];
    for (let k = 0; k <= q; k++) {
      const w = Math.sqrt(row[k]);  // square root: small weights stay visible
      const level = Math.round(255 * (1 - w));
      ctx.fillStyle = `rgb(${level}, ${level}, 255)`;
      ctx.fillRect(k * cell, q * cell, cell, cell);
    }
  }
  canvas.dataset.tokens = String(n);
  canvas.onmousemove = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const k = Math.floor((ev.clientX - rect.left) / cell);
    const q = Math.floor((ev.clientY - rect.top) / cell);
    if (q < 0 || q >= n || k < 0 || k > q) { canvas.title = ""; return; }
    canvas.title = `${visible(data.tokens[q])} -> ${visible(data.tokens[k])}: ${data.weights[q][k].toFixed(4)}`;
  };
  canvas.onclick = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const q = Math.floor((ev.clientY - rect.top) / cell);
    if (q >= 0 && q < n) drawStrip(data, q);
  };
}

// ---- embeddings ----------------------------------------------------------------------------

async function nearestLines() {
  const lines = $("embed-lines").value.split("\n").map((l) => l.trim()).filter((l) => l);
  const query = $("embed-query").value.trim();
  const results = $("embed-results");
  results.innerHTML = "";
  if (!lines.length || !query) { $("embed-status").textContent = "give some lines and a query"; return; }
  if (!state.embedModel) { $("embed-status").textContent = "this server has no embedding model (--embed)"; return; }
  $("embed-status").textContent = "embedding…";
  try {
    const data = await api("/v1/embeddings", { model: state.embedModel, input: [query, ...lines], encoding_format: "float" });
    const vectors = data.data.map((d) => d.embedding);
    const scores = lines.map((line, i) => ({ line, score: cosine(vectors[0], vectors[i + 1]) }));
    scores.sort((a, b) => b.score - a.score);
    for (const { line, score } of scores) {
      const li = document.createElement("li");
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = score.toFixed(3);
      const t = document.createElement("span");
      t.className = "line";
      t.textContent = line;
      li.append(s, t);
      results.append(li);
    }
    $("embed-status").textContent = `${lines.length} lines ranked`;
  } catch (err) {
    $("embed-status").textContent = "error: " + err.message;
  }
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb || 1);
}

// ---- wiring --------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("panel-chat").hidden = name !== "chat";
  $("panel-embed").hidden = name !== "embed";
}

async function init() {
  $("api-key").value = localStorage.getItem("lmarch-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("lmarch-api-key", $("api-key").value));
  for (const [input, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    $(input).addEventListener("input", () => { $(out).textContent = $(input).value; });
  }
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("reset").addEventListener("click", () => {
    state.messages = [];
    $("conversation").innerHTML = "";
    $("attention").hidden = true;
    $("show-attention").disabled = true;
    setStatus("idle");
  });
  $("show-attention").addEventListener("click", loadAttention);
  $("attn-layer").addEventListener("change", loadAttention);
  $("attn-head").addEventListener("change", loadAttention);
  $("embed-search").addEventListener("click", nearestLines);
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model;
    state.embedModel = health.embedding_model;
    $("model-name").textContent = [health.model, health.embedding_model].filter((x) => x).join(" + ");
    if (!health.model) { $("send").disabled = true; showTab("embed"); }
  } catch (err) {
    $("model-name").textContent = "(server unreachable)";
  }
}

init();
