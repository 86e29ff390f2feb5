/**
 * editiond browser client: tells a web app when a new version of its data exists.
 *
 * ```js
 * import { Edition } from "https://push.example.com/edition.js";
 * const ed = new Edition();
 * ed.addEventListener("update", (e) => refetch(e.detail.appid, e.detail.version));
 * const { appid, endpoint } = await ed.register();   // hand `endpoint` to your app server
 * ```
 *
 * One WebSocket per (server, storage key) and origin, not per tab: Editions of one origin elect
 * a leader with Web Locks; the leader holds the socket and shares updates, requests and state
 * with the others over a BroadcastChannel. The wire protocol is proto/websocket.md; this API is
 * proto/browser.md. No dependencies, no build step.
 *
 * @module edition
 */

/** Milliseconds between JSON pings, well under common proxy idle timeouts (often 60 s). */
const PING_EVERY_MS = 25_000;
/** A socket that answers nothing for this long after a ping is taken for dead. */
const PONG_WITHIN_MS = 10_000;
/** Reconnect backoff: the first delay, and the cap it doubles up to (both jittered down by up to half). */
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 30_000;

/**
 * Connection state, as carried by `state` events.
 * @typedef {"connecting" | "open" | "closed"} EditionState
 */

/**
 * Options of {@link Edition}.
 * @typedef {object} EditionOptions
 * @property {string} [url] WebSocket URL of the server (`ws(s)://host/v1/ws`; an `http(s)://`
 *   URL is turned into `ws(s)://`). Default: the origin this module was loaded from + `/v1/ws`.
 * @property {string} [storageKey] Where the UAID and its secret are kept. Default `"editiond"`.
 * @property {Storage | Record<string, string>} [storage] Default `localStorage`.
 */

/**
 * A user agent's connection to editiond. Events: `update` (`detail: {appid, version}`),
 * `state` (`detail`: an {@link EditionState}), `error` (`detail: {error, message}`).
 */
export class Edition extends EventTarget {
  #url;
  #key;
  #storage;
  /** @type {EditionState} */
  #state = "connecting";
  /** @type {string | null} */
  #uaid = null;
  #closed = false;
  /** Last version dispatched per APPID: an update seen again (redelivered, or from another tab) is skipped. */
  #seen = new Map();

  // Sharing between Editions of one origin; null when each keeps its own socket.
  /** @type {BroadcastChannel | null} */
  #channel = null;
  #abort = new AbortController();
  /** Releases the leader lock. */
  #release = () => {};
  /** Requests sent to the leader, not answered yet: id → {op, appid, done}. Re-sent to each new leader. */
  #asked = new Map();

  // The socket, while this Edition leads.
  #leading = false;
  /** @type {WebSocket | null} */
  #ws = null;
  /** Register/unregister requests: "op appid" → {op, appid, waiters}. Sent once open, again after a reconnect. */
  #ops = new Map();
  #attempt = 0;
  #retryTimer = 0;
  #pingTimer = 0;
  #pongTimer = 0;
  #online = () => this.#retryNow();

  /** @param {EditionOptions} [options] */
  constructor(options = {}) {
    super();
    this.#url = wsUrl(options.url ?? new URL("/v1/ws", import.meta.url).href);
    this.#key = options.storageKey ?? "editiond";
    this.#storage = options.storage ?? defaultStorage();
    this.#uaid = this.#load()?.uaid ?? null;
    // Listeners added right after construction still hear the first state.
    queueMicrotask(() => this.#closed || this.#emit("state", this.#state));
    const name = `editiond ${this.#url} ${this.#key}`;
    if (!globalThis.navigator?.locks || typeof BroadcastChannel !== "function") {
      this.#lead();
      return;
    }
    this.#channel = new BroadcastChannel(name);
    this.#channel.onmessage = (e) => this.#heard(e.data);
    navigator.locks
      .request(name, { signal: this.#abort.signal }, () => new Promise((release) => {
        this.#release = release;
        if (this.#closed) release();
        else this.#lead();
      }))
      .catch(() => {}); // aborted by close() before this Edition led
    this.#post({ t: "hello" });
  }

  /** The UAID this user agent speaks for; set once the first connection is open. @type {string | null} */
  get uaid() {
    return this.#uaid;
  }

  /** The connection state. @type {EditionState} */
  get state() {
    return this.#state;
  }

  /** Whether this Edition holds the socket (the leader among its origin's tabs). @type {boolean} */
  get leader() {
    return this.#leading;
  }

  /**
   * Registers an app and gets the endpoint its app server PUTs versions to. Idempotent: the same
   * appid gets the same endpoint. Waits while disconnected.
   * @param {string} [appid] A UUID4 (see {@link uuid4}); a new one by default.
   * @returns {Promise<{appid: string, endpoint: string}>}
   */
  register(appid = uuid4()) {
    return this.#request("register", appid);
  }

  /**
   * Unregisters an app: its endpoint answers 410 from then on. Resolves once the app is not
   * registered (also when it was not). Waits while disconnected.
   * @param {string} appid
   * @returns {Promise<void>}
   */
  async unregister(appid) {
    await this.#request("unregister", appid);
  }

  /** Closes the connection (another tab takes it over if it leads) and fails what is still waiting. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    const closed = new Error("Edition closed");
    if (this.#leading) this.#post({ t: "state", state: "connecting", uaid: this.#uaid });
    // Closed first, so what other tabs asked is not failed here: they ask the next leader.
    this.#channel?.close();
    this.#channel = null;
    if (this.#leading) {
      this.#stopSocket();
      this.#leading = false;
      globalThis.removeEventListener?.("online", this.#online);
      for (const op of this.#ops.values()) for (const done of op.waiters) done(closed);
      this.#ops.clear();
    }
    for (const { done } of this.#asked.values()) done(closed);
    this.#asked.clear();
    this.#abort.abort();
    this.#release();
    this.#setState("closed");
  }

  // ---- requests: answered by the leader, here or in another tab ----

  #request(op, appid) {
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(new Error("Edition closed"));
      const done = (error, result) => (error ? reject(error) : resolve(result));
      if (this.#leading) return this.#enqueue(op, appid, done);
      const id = uuid4();
      this.#asked.set(id, { op, appid, done });
      this.#post({ t: "req", id, op, appid });
    });
  }

  /** Queues an operation on the socket; `done(error, result)` runs once the server answered. */
  #enqueue(op, appid, done) {
    const key = `${op} ${appid}`;
    let pending = this.#ops.get(key);
    if (!pending) {
      pending = { op, appid, waiters: [] };
      this.#ops.set(key, pending);
      if (this.#state === "open") this.#send({ type: op, uaid: this.#uaid, appid });
    }
    pending.waiters.push(done);
  }

  /** A `register` or `unregister` reply. */
  #answered(msg) {
    const pending = this.#ops.get(`${msg.type} ${msg.appid}`);
    // 403: the UAID was taken by another connection; the request is sent again after reconnecting.
    if (!pending || msg.uaid !== this.#uaid || msg.status === 403) return;
    this.#ops.delete(`${msg.type} ${msg.appid}`);
    let error = null;
    let result;
    if (msg.type === "register" && msg.status === 200) {
      result = { appid: msg.appid, endpoint: msg.endpoint };
    } else if (msg.type === "unregister" && (msg.status === 200 || msg.status === 404)) {
      this.#forget(msg.appid);
      this.#post({ t: "forget", appid: msg.appid });
    } else {
      error = Object.assign(new Error(`${msg.type} ${msg.appid}: ${msg.message ?? msg.error}`), {
        status: msg.status,
        error: msg.error,
      });
    }
    for (const done of pending.waiters) done(error, result);
  }

  // ---- leading: the socket ----

  #lead() {
    this.#leading = true;
    // What this Edition asked the previous leader and never heard back is now its own to do.
    for (const { op, appid, done } of this.#asked.values()) this.#enqueue(op, appid, done);
    this.#asked.clear();
    globalThis.addEventListener?.("online", this.#online);
    this.#connect();
    // Tells the others who leads now, so they (re)send what they asked.
    this.#post({ t: "state", state: this.#state, uaid: this.#uaid, lead: true });
  }

  #connect() {
    this.#retryTimer = 0;
    this.#setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.#url);
    } catch (e) {
      this.#emit("error", { error: "bad_url", message: String(e) });
      return this.#retry();
    }
    this.#ws = ws;
    ws.onopen = () => {
      const stored = this.#load();
      this.#send({ type: "hello", uaids: [stored ? { uaid: stored.uaid, secret: stored.secret } : {}] });
      this.#pingTimer = setInterval(() => this.#ping(), PING_EVERY_MS);
    };
    ws.onmessage = (e) => {
      clearTimeout(this.#pongTimer);
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return;
      }
      this.#receive(msg);
    };
    ws.onclose = () => {
      if (this.#ws !== ws) return;
      this.#stopSocket();
      if (!this.#closed) this.#retry();
    };
  }

  #receive(msg) {
    switch (msg.type) {
      case "hello":
      case "claim":
        return this.#identified(msg.type, msg.uaids?.[0]);
      case "update":
        return this.#updated(msg.updates ?? {});
      case "register":
      case "unregister":
        return this.#answered(msg);
      case "released":
        // Another connection took this UAID (a tab without Web Locks, another profile with the
        // same storage): wait long before taking it back, so two holders do not trade it in a loop.
        if (msg.uaids?.includes(this.#uaid)) {
          this.#attempt = 30;
          this.#ws?.close();
        }
        return;
      case "error":
        return console.warn("editiond:", msg.error, msg.message);
    }
  }

  /** The hello (or claim) reply for our one UAID. */
  #identified(type, entry) {
    if (!entry) return;
    if (entry.status === 200) {
      if (entry.secret) this.#save({ uaid: entry.uaid, secret: entry.secret });
      this.#uaid = entry.uaid;
      this.#attempt = 0;
      this.#setState("open");
      for (const { op, appid } of this.#ops.values()) this.#send({ type: op, uaid: this.#uaid, appid });
      return;
    }
    if (type === "claim") {
      // Even a new UAID was refused: try again later on a new socket.
      this.#stopSocket();
      return this.#retry();
    }
    // The stored UAID was refused (data wiped server-side, or the storage was tampered with):
    // start over with a new one. Registrations of the old one are gone.
    this.#save(null);
    const detail = { error: entry.error, message: `stored UAID refused (${entry.message}); a new one is made` };
    this.#emit("error", detail);
    this.#post({ t: "error", detail });
    this.#send({ type: "claim", uaids: [{}] });
  }

  #updated(updates) {
    const apps = updates[this.#uaid];
    if (!apps) return;
    for (const [appid, version] of Object.entries(apps)) {
      this.#deliver(appid, version);
      this.#post({ t: "update", appid, version });
    }
    // Every listener here has run (dispatchEvent is synchronous), and the other tabs' copies are
    // queued; a tab that dies before this ACK leaves the update pending for the next leader.
    this.#send({ type: "ack", uaids: [this.#uaid] });
  }

  #ping() {
    this.#send({ type: "ping" });
    clearTimeout(this.#pongTimer);
    this.#pongTimer = setTimeout(() => {
      this.#stopSocket();
      this.#retry();
    }, PONG_WITHIN_MS);
  }

  /** Forgets the current socket and its timers (the caller closes it if it must). */
  #stopSocket() {
    const ws = this.#ws;
    this.#ws = null;
    clearInterval(this.#pingTimer);
    clearTimeout(this.#pongTimer);
    clearTimeout(this.#retryTimer);
    this.#retryTimer = 0;
    if (ws && ws.readyState <= WebSocket.OPEN) {
      ws.onclose = null;
      ws.close(1000);
    }
  }

  /** Reconnects after a jittered, exponentially growing delay (reset by a successful hello). */
  #retry() {
    if (this.#closed) return;
    this.#setState("connecting");
    const ceiling = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** Math.min(this.#attempt, 30));
    this.#attempt += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#connect(), ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  /** The network came back: skip the rest of the backoff. */
  #retryNow() {
    if (this.#retryTimer && !this.#closed) {
      clearTimeout(this.#retryTimer);
      this.#connect();
    }
  }

  #send(frame) {
    if (this.#ws?.readyState === WebSocket.OPEN) this.#ws.send(JSON.stringify(frame));
  }

  // ---- following: what the leader shares ----

  #heard(m) {
    if (this.#closed || !m) return;
    if (this.#leading) {
      if (m.t === "hello") this.#post({ t: "state", state: this.#state, uaid: this.#uaid, lead: true });
      if (m.t === "req") {
        this.#enqueue(m.op, m.appid, (error, result) =>
          this.#post({ t: "res", id: m.id, result, error: error && { message: error.message, status: error.status, error: error.error } }));
      }
      return;
    }
    switch (m.t) {
      case "state":
        if (m.uaid) this.#uaid = m.uaid;
        this.#setState(m.state);
        // A leader (new, or answering our hello) may not have seen what we asked: ask again.
        // Repeats are harmless (register and unregister are idempotent; a second answer is ignored).
        if (m.lead) for (const [id, { op, appid }] of this.#asked) this.#post({ t: "req", id, op, appid });
        return;
      case "update":
        return this.#deliver(m.appid, m.version);
      case "forget":
        return this.#forget(m.appid);
      case "error":
        return this.#emit("error", m.detail);
      case "res": {
        const asked = this.#asked.get(m.id);
        if (!asked) return;
        this.#asked.delete(m.id);
        return asked.done(m.error && Object.assign(new Error(m.error.message), m.error), m.result);
      }
    }
  }

  // ---- shared by both roles ----

  #deliver(appid, version) {
    if (version <= (this.#seen.get(appid) ?? -1)) return;
    this.#seen.set(appid, version);
    this.#emit("update", { appid, version });
  }

  /** After an unregister: a new registration of the same appid starts its versions again. */
  #forget(appid) {
    this.#seen.delete(appid);
  }

  #setState(state) {
    if (state === this.#state || this.#closed !== (state === "closed")) return;
    this.#state = state;
    this.#emit("state", state);
    if (this.#leading) this.#post({ t: "state", state, uaid: this.#uaid });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #post(message) {
    this.#channel?.postMessage(message);
  }

  /** @returns {{uaid: string, secret: string} | null} */
  #load() {
    try {
      const s = this.#storage;
      const text = typeof s?.getItem === "function" ? s.getItem(this.#key) : s?.[this.#key];
      const value = text ? JSON.parse(text) : null;
      return typeof value?.uaid === "string" && typeof value?.secret === "string" ? value : null;
    } catch {
      return null; // unreadable or blocked storage: act as a new user agent
    }
  }

  #save(value) {
    try {
      const s = this.#storage;
      if (typeof s?.setItem === "function") {
        if (value) s.setItem(this.#key, JSON.stringify(value));
        else s.removeItem(this.#key);
      } else if (s) {
        if (value) s[this.#key] = JSON.stringify(value);
        else delete s[this.#key];
      }
    } catch {
      // Storage full or blocked: this page keeps working; a reload starts as a new user agent.
    }
  }
}

/** A random UUID4. `crypto.randomUUID` exists only in secure contexts; `getRandomValues` everywhere. */
export function uuid4() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** `localStorage`, or none where the page may not use it (a sandboxed frame throws). */
function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

/** `http(s)://…` → `ws(s)://…`; anything else unchanged. */
function wsUrl(url) {
  return url.replace(/^http(s?):/i, "ws$1:");
}
