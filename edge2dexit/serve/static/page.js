"use strict";
// The page of `edge2dexit serve`. What is typed goes to the stream (/v1/stream) as it arrives, one message in
// flight at a time: what is typed meanwhile goes as one piece when the reply comes. An edit that is not an
// addition at the end starts the text again ({"reset": true}); a pause in typing finishes it ({"finish": true}),
// so that its last sentence is read too. Every reply is drawn: the decision, and each sentence read or not.

const $ = (id) => document.getElementById(id);
const PAUSE_MS = 700;

let socket = null;
let sent = "";         // the text the stream holds: what was sent since the last reset
let finished = false;  // the stream's text was finished
let busy = false;      // a message awaits its reply
let paused = false;    // typing paused
let refused = false;   // the text was refused: wait for an edit before sending it again
let pauseTimer = null;
let key = sessionStorage.getItem("edge2dexit-key") || "";

function status(text) { $("status").textContent = text; }

async function loadBundle() {
  const response = await fetch("/v1/bundle", { headers: key ? { Authorization: "Bearer " + key } : {} });
  if (response.status === 401) {
    $("key-field").hidden = false;
    status("this service needs its API key");
    return false;
  }
  const bundle = await response.json();
  $("policy").replaceChildren(...Object.keys(bundle.policies).map(
    (name) => new Option(name, name, false, name === bundle.default_policy)));
  return true;
}

function connect() {
  const url = new URL("/v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("policy", $("policy").value);
  const protocols = key ? ["edge2dexit", "bearer." + base64url(key)] : ["edge2dexit"];
  const mine = new WebSocket(url, protocols);
  if (socket) socket.close();
  socket = mine;
  sent = ""; finished = false; busy = false;
  mine.onopen = () => { status("connected"); pump(); };
  mine.onmessage = (event) => { busy = false; show(JSON.parse(event.data)); pump(); };
  mine.onclose = () => {
    if (socket !== mine) return;  // replaced by another policy's stream
    status("disconnected; retrying…");
    setTimeout(connect, 1000);
  };
}

function pump() {
  if (busy || refused || !socket || socket.readyState !== WebSocket.OPEN) return;
  const text = $("text").value;
  let message = null;
  if (!text.startsWith(sent) || (finished && text !== sent)) {
    message = { reset: true };
    sent = ""; finished = false;
  } else if (text.length > sent.length) {
    message = { text: text.slice(sent.length) };
    sent = text;
  } else if (paused && !finished && text.trim()) {
    message = { finish: true };
    finished = true;
  }
  if (message) {
    busy = true;
    socket.send(JSON.stringify(message));
  }
}

function show(report) {
  const error = $("error");
  if (report.error) {  // the stream has dropped that text
    error.textContent = `${report.error} (${report.kind}, exit code ${report.exit_code})`;
    error.hidden = false;
    sent = ""; finished = false; refused = true;
    return;
  }
  error.hidden = true;
  const result = report.result;
  const label = $("label");
  label.textContent = result ? result.label : report.sentences.length ? "reading…" : "—";
  label.className = result ? "label" : "label pending";
  $("exit").textContent = !result ? "" : describe(result, report.n_layer);
  $("scores").replaceChildren(...Object.entries(result ? result.scores : {}).map(([name, score]) =>
    element("div", "score", name, bar(score), `${(100 * score).toFixed(1)}%`)));
  // each sentence the deciding head read, shaded by how far it pushed towards the answer (or away from it)
  const weights = new Map((result && result.evidence ? result.evidence.sentences : [])
    .map((s) => [s.index, s.contribution]));
  const strongest = Math.max(1e-9, ...[...weights.values()].map(Math.abs));
  $("sentences").replaceChildren(...report.sentences.map((sentence, k) => {
    const state = sentence.read ? "read" : result ? "unread" : "waiting";
    const item = element("li", `sentence ${state}` + (result && k === result.exit_sentence ? " exit" : ""),
      element("span", "text", sentence.text),
      sentence.read ? element("div", "depth", `layers 1–${sentence.layers} of ${report.n_layer}`,
                              bar(sentence.layers / report.n_layer))
                    : element("div", "depth", state === "unread" ? "not read" : "not read yet"));
    item.dataset.state = state;
    if (weights.has(k)) {
      const weight = weights.get(k);
      item.dataset.weight = weight.toFixed(3);
      item.style.setProperty("--weight", (Math.abs(weight) / strongest).toFixed(3));
      item.classList.add(weight >= 0 ? "towards" : "against");
      item.title = `${weight >= 0 ? "+" : ""}${weight.toFixed(2)} to the log-odds of ${result.evidence.label} ` +
                   `over ${result.evidence.against}`;
    }
    return item;
  }));
  const share = report.full_token_layers ? report.token_layers / report.full_token_layers : 0;
  $("cost").replaceChildren(...(report.sentences.length ? [
    element("div", "score", "cost", bar(share), `${(100 * share).toFixed(0)}%`),
    `${report.token_layers} token-layers computed, against ${report.full_token_layers} for a full read of ` +
    `these sentences (every token through all ${report.n_layer} layers)`] : []));
}

function describe(result, nLayer) {
  // who answered, how, and what the other one thought
  const words = result.words ? Object.entries(result.words).sort((a, b) => b[1] - a[1])[0] : null;
  const thought = words ? `; the words alone would say ${words[0]} (${(100 * words[1]).toFixed(0)}%)` : "";
  if (result.answered_by === "words") return "the words alone decided, before any layer";
  const where = `the LLM decided on sentence ${result.exit_sentence + 1}, at layer ${result.exit_layer + 1} of ` +
    `${nLayer}` + (result.early ? " — early exit" : " — after reading all of it");
  return result.answered_by === "llm+words" ? `${where}, with the words weighed in` : where + thought;
}

function element(tag, className, ...children) {
  const node = document.createElement(tag);
  node.className = className;
  node.append(...children);
  return node;
}

function bar(share) {
  const fill = document.createElement("span");
  fill.style.width = `${Math.min(100, 100 * share).toFixed(1)}%`;
  return element("div", "bar", fill);
}

function base64url(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

$("text").addEventListener("input", () => {
  refused = false;
  paused = false;
  clearTimeout(pauseTimer);
  pauseTimer = setTimeout(() => { paused = true; pump(); }, PAUSE_MS);
  pump();
});
$("policy").addEventListener("change", connect);
$("key").addEventListener("change", async () => {
  key = $("key").value;
  sessionStorage.setItem("edge2dexit-key", key);
  if (await loadBundle()) connect();
});
loadBundle().then((ok) => { if (ok) connect(); });
