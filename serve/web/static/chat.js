// The 小X chat room: history, a live SSE stream with hand-made reconnects, and sending.
// Every piece of user or bot text goes into the page with textContent, never innerHTML.
"use strict";

(function () {
  const NEAR_BOTTOM_PX = 80; // closer than this to the end counts as "reading the newest"
  const HISTORY_LIMIT = 50; // the server's default history_limit
  const MAX_RENDERED = 500; // older messages leave the page past this many
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const STALLED_REPLY_MS = 60000; // a reply with no token for this long stops "typing"
  const MAX_SEEN = 2000; // event ids remembered for de-duplication (oldest forgotten first)
  const MAX_SETTLED = 500; // finished reply ids remembered (a late token starts nothing)
  const EVENT_NAMES = ["message", "typing", "token", "join", "leave", "reset"];

  const room = new URLSearchParams(window.location.search).get("room") || "lobby";

  const els = {
    roomName: document.getElementById("room-name"),
    me: document.getElementById("me"),
    banner: document.getElementById("banner"),
    messages: document.getElementById("messages"),
    empty: document.getElementById("empty"),
    newMessages: document.getElementById("new-messages"),
    composer: document.getElementById("composer"),
    input: document.getElementById("input"),
    send: document.getElementById("send"),
    sendError: document.getElementById("send-error"),
  };

  const state = {
    me: null,
    tag: null, // our session's public tag (from /history): tells us from others of our name
    lastEventId: null, // sent back as ?last_event_id= when we reopen the stream
    seen: new Set(), // event ids already applied (history and stream overlap, replays)
    pending: new Map(), // reply_id -> {item, text, timer} of a reply still streaming
    settled: new Set(), // reply_ids whose final message is on the page
    source: null,
    retryMs: BACKOFF_MIN_MS,
    retryTimer: null,
    sendKey: null, // Idempotency-Key of the text being sent, kept until it is accepted
    sendKeyText: null,
    sending: false,
  };

  // ---- helpers -------------------------------------------------------------------------

  // Adds to a Set that keeps only its newest `max` entries (a Set iterates oldest first):
  // a page left open for days holds a bounded memory. Replays and history only reach back
  // over recent ids, so forgetting the oldest loses no de-duplication that matters.
  function remember(set, value, max) {
    set.add(value);
    if (set.size <= max) return;
    for (const old of set) {
      set.delete(old);
      if (set.size <= max) break;
    }
  }

  function goToLogin() {
    window.location.assign("/login");
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function toDate(ts) {
    if (typeof ts === "number") return new Date(ts < 1e12 ? ts * 1000 : ts); // s or ms
    if (typeof ts === "string" && ts) {
      const asNumber = Number(ts);
      return Number.isFinite(asNumber) ? toDate(asNumber) : new Date(ts);
    }
    return new Date();
  }

  function formatTime(ts) {
    const d = toDate(ts);
    if (Number.isNaN(d.getTime())) return "";
    const pad = (n) => String(n).padStart(2, "0");
    const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return hm;
    return pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + hm;
  }

  // ---- scrolling: follow the newest only when the reader is already there ----------------

  function isNearBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight <= NEAR_BOTTOM_PX;
  }

  function scrollToBottom() {
    els.messages.scrollTop = els.messages.scrollHeight;
    els.newMessages.hidden = true;
  }

  // Applies a change to the list, then keeps the view at the bottom if it was there.
  function changeList(change, forceBottom) {
    const stick = forceBottom || isNearBottom();
    change();
    if (stick) scrollToBottom();
    else els.newMessages.hidden = false;
  }

  function appendItem(item) {
    els.empty.hidden = true;
    els.messages.appendChild(item);
    const items = els.messages.querySelectorAll(".msg, .notice");
    for (let i = 0; i < items.length - MAX_RENDERED; i++) items[i].remove();
  }

  // ---- rendering -----------------------------------------------------------------------

  // Ours: our name and, where the event carries one, our session's tag (two people may
  // share a name; the tag tells them apart).
  function isMine(user, tag) {
    if (user !== state.me) return false;
    return !tag || !state.tag || tag === state.tag;
  }

  function messageItem(role, user, ts, tag) {
    const isBot = role === "bot";
    const mine = !isBot && isMine(user, tag);
    const item = el("article", "msg " + (isBot ? "msg-bot" : "msg-user") + (mine ? " mine" : ""));
    const name = isBot ? user || "小X" : user || "？";
    item.appendChild(el("div", "avatar", isBot ? "X" : Array.from(name)[0]));
    const body = el("div", "body");
    const meta = el("div", "meta");
    meta.appendChild(el("span", "author", name));
    if (!isBot && typeof tag === "string" && tag) meta.appendChild(el("span", "tag", "#" + tag));
    meta.appendChild(el("time", "time", formatTime(ts)));
    body.appendChild(meta);
    body.appendChild(el("div", "bubble"));
    item.appendChild(body);
    return item;
  }

  function setText(item, text) {
    item.querySelector(".bubble").textContent = text;
  }

  function addMessage(data) {
    if (data.role === "bot" && data.reply_id != null) {
      const replyId = String(data.reply_id);
      remember(state.settled, replyId, MAX_SETTLED);
      const pending = state.pending.get(replyId);
      if (pending) {
        // The streamed reply settles into its final text, in place.
        clearTimeout(pending.timer);
        state.pending.delete(replyId);
        changeList(function () {
          pending.item.classList.remove("streaming");
          if (data.error) pending.item.classList.add("failed");
          pending.item.dataset.id = String(data.id);
          setText(pending.item, data.text);
          const typing = pending.item.querySelector(".typing");
          if (typing) typing.remove();
        });
        return;
      }
    }
    const item = messageItem(data.role, data.user, data.ts, data.tag);
    if (data.error) item.classList.add("failed"); // "busy" or "failed" stand-in text
    item.dataset.id = String(data.id);
    if (data.reply_id != null) item.dataset.replyId = String(data.reply_id);
    setText(item, data.text);
    const mine = item.classList.contains("mine");
    changeList(function () {
      appendItem(item);
    }, mine);
  }

  function stallLater(replyId, pending) {
    clearTimeout(pending.timer);
    pending.timer = setTimeout(function () {
      // No final message came (the server may have lost it): stop saying "typing".
      pending.item.classList.remove("streaming");
      pending.item.classList.add("stalled");
      const typing = pending.item.querySelector(".typing");
      if (typing) typing.remove();
      state.pending.delete(replyId);
    }, STALLED_REPLY_MS);
  }

  function pendingReply(data) {
    const replyId = String(data.reply_id);
    if (state.settled.has(replyId)) return null;
    let pending = state.pending.get(replyId);
    if (!pending) {
      const item = messageItem("bot", data.user || "小X", data.ts);
      item.classList.add("streaming");
      item.dataset.replyId = replyId;
      const typing = el("div", "typing");
      typing.appendChild(el("span", "dots"));
      typing.appendChild(el("span", "typing-text", "正在输入…"));
      item.querySelector(".body").appendChild(typing);
      pending = { item: item, text: "", timer: null };
      state.pending.set(replyId, pending);
      changeList(function () {
        appendItem(item);
      });
    }
    stallLater(replyId, pending);
    return pending;
  }

  function addToken(data) {
    const pending = pendingReply(data);
    if (!pending || typeof data.delta !== "string") return;
    pending.text += data.delta;
    changeList(function () {
      setText(pending.item, pending.text);
    });
  }

  function addNotice(kind, data) {
    if (!data.user || isMine(data.user, data.tag)) return;
    const who = data.user + (typeof data.tag === "string" && data.tag ? "#" + data.tag : "");
    const text = who + (kind === "join" ? " 进入了聊天室" : " 离开了聊天室");
    const item = el("p", "notice", text);
    changeList(function () {
      appendItem(item);
    });
  }

  function applyEvent(kind, data, eventId) {
    const id = eventId || (data.id != null ? String(data.id) : "");
    if (kind === "reset") return reload();
    if (id) {
      if (state.seen.has(id)) return;
      remember(state.seen, id, MAX_SEEN);
    }
    if (kind === "message") addMessage(data);
    else if (kind === "typing") pendingReply(data);
    else if (kind === "token") addToken(data);
    else if (kind === "join" || kind === "leave") addNotice(kind, data);
  }

  // ---- the live stream -----------------------------------------------------------------

  function setConnected(connected) {
    els.banner.hidden = connected;
    document.body.dataset.connection = connected ? "live" : "reconnecting";
  }

  function connect() {
    clearTimeout(state.retryTimer);
    const params = new URLSearchParams({ room: room });
    if (state.lastEventId) params.set("last_event_id", state.lastEventId);
    const source = new EventSource("/stream?" + params.toString());
    state.source = source;
    source.onopen = function () {
      state.retryMs = BACKOFF_MIN_MS;
      setConnected(true);
    };
    // EventSource gives up for good after a non-200 answer, and its own retries would
    // resend the stale ?last_event_id= above: so every error closes it and we reopen by hand.
    source.onerror = function () {
      if (state.source !== source) return;
      source.close();
      state.source = null;
      setConnected(false);
      scheduleReconnect();
    };
    EVENT_NAMES.forEach(function (kind) {
      source.addEventListener(kind, function (e) {
        if (state.source !== source) return;
        let data;
        try {
          data = JSON.parse(e.data);
        } catch (err) {
          return;
        }
        if (e.lastEventId) state.lastEventId = e.lastEventId;
        applyEvent(kind, data, e.lastEventId);
      });
    });
  }

  // The server no longer has every event after our last id (the room's log was trimmed
  // or the room expired): what the page shows may have gaps. Start over from /history.
  function reload() {
    if (state.source) state.source.close();
    state.source = null;
    state.pending.forEach(function (p) {
      clearTimeout(p.timer);
    });
    state.pending.clear();
    state.seen.clear();
    state.settled.clear();
    state.lastEventId = null;
    els.messages.querySelectorAll(".msg, .notice").forEach(function (node) {
      node.remove();
    });
    els.empty.hidden = false;
    start();
  }

  function scheduleReconnect() {
    clearTimeout(state.retryTimer);
    const delay = state.retryMs * (0.75 + Math.random() * 0.5); // jitter: not all at once
    state.retryMs = Math.min(state.retryMs * 2, BACKOFF_MAX_MS);
    state.retryTimer = setTimeout(reconnect, delay);
  }

  async function reconnect() {
    // The session may be gone (logged out elsewhere, a new secret): ask before reopening.
    try {
      const res = await fetch("/me", { credentials: "same-origin", cache: "no-store" });
      if (res.status === 401) return goToLogin();
      if (!res.ok) return scheduleReconnect();
    } catch (err) {
      return scheduleReconnect();
    }
    if (state.me === null) return start();
    connect();
  }

  window.addEventListener("online", function () {
    if (!state.source) {
      state.retryMs = BACKOFF_MIN_MS;
      reconnect();
    }
  });

  // ---- sending -------------------------------------------------------------------------

  function showSendError(text) {
    els.sendError.textContent = text;
    els.sendError.hidden = !text;
  }

  async function errorText(res) {
    if (res.status === 429) return "发送太频繁了，请稍后再试。";
    try {
      const body = await res.json();
      if (body && typeof body.error === "string") return body.error;
      if (body && typeof body.detail === "string") return body.detail;
    } catch (err) {
      // not JSON: fall through
    }
    return "发送失败（" + res.status + "），请稍后再试。";
  }

  function fitInput() {
    const lines = els.input.value.split("\n").length;
    els.input.rows = Math.min(5, Math.max(1, lines));
  }

  function sendKey(text) {
    if (state.sendKey === null || state.sendKeyText !== text) {
      const bytes = crypto.getRandomValues(new Uint8Array(16));
      state.sendKey = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      state.sendKeyText = text;
    }
    return state.sendKey;
  }

  async function send() {
    const text = els.input.value;
    if (!text.trim() || state.sending) return;
    state.sending = true;
    els.send.disabled = true;
    try {
      const res = await fetch("/send?room=" + encodeURIComponent(room), {
        method: "POST",
        credentials: "same-origin",
        // The same key while the same text is resent: a message stored although its
        // answer was lost (or a 503) is not stored, nor answered, twice.
        headers: { "Content-Type": "application/json", "Idempotency-Key": sendKey(text) },
        body: JSON.stringify({ message: text }),
      });
      if (res.status === 401) return goToLogin();
      if (!res.ok) {
        showSendError(await errorText(res));
        return;
      }
      showSendError("");
      state.sendKey = null;
      els.input.value = "";
      fitInput();
    } catch (err) {
      showSendError("发送失败，请检查网络连接。");
    } finally {
      state.sending = false;
      els.send.disabled = false;
      els.input.focus();
    }
  }

  els.composer.addEventListener("submit", function (e) {
    e.preventDefault();
    send();
  });

  els.input.addEventListener("keydown", function (e) {
    if (e.key !== "Enter" || e.shiftKey) return;
    if (e.isComposing || e.keyCode === 229) return; // this Enter belongs to the IME
    e.preventDefault();
    send();
  });

  els.input.addEventListener("input", fitInput);

  els.messages.addEventListener("scroll", function () {
    if (isNearBottom()) els.newMessages.hidden = true;
  });

  els.newMessages.addEventListener("click", scrollToBottom);

  // ---- start ---------------------------------------------------------------------------

  async function loadHistory() {
    const params = new URLSearchParams({ room: room, limit: String(HISTORY_LIMIT) });
    const res = await fetch("/history?" + params.toString(), {
      credentials: "same-origin",
      cache: "no-store",
    });
    if (res.status === 401) return goToLogin();
    if (!res.ok) return; // the live stream still works without the past
    const body = await res.json();
    if (body.you && typeof body.you.tag === "string") state.tag = body.you.tag;
    (body.messages || []).forEach(function (m) {
      applyEvent("message", m, m.id != null ? String(m.id) : "");
    });
    if (body.cursor) state.lastEventId = String(body.cursor);
    scrollToBottom();
  }

  async function start() {
    els.roomName.textContent = "#" + room;
    document.title = "小X 聊天室 · " + room;
    try {
      const res = await fetch("/me", { credentials: "same-origin", cache: "no-store" });
      if (res.status === 401) return goToLogin();
      if (!res.ok) throw new Error("/me " + res.status);
      state.me = (await res.json()).user;
      els.me.textContent = state.me;
      await loadHistory();
    } catch (err) {
      state.me = null;
      setConnected(false);
      return scheduleReconnect();
    }
    connect();
  }

  start();
})();
