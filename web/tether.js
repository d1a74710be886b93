// Tether's example browser client: the protocol of docs/PROTOCOL.md over
// WebSocket (section "WebSocket"), with no library. It logs in with a
// token, answers the heartbeat, acknowledges pushes, sends uplinks (and
// sends again, with the same client_msg_id, those not yet acknowledged
// after a reconnect), and resumes its session after a drop, so that
// nothing is lost and nothing is handed to the app twice.
//
// The protobuf codec below covers only the messages a device exchanges
// (proto/tether/v1/client.proto). It is hand-written so that the page
// needs no build step and no download: a page served from the gateway
// binary, on machines without internet. Numbers are JavaScript numbers:
// every id and seq the gateway hands out stays below 2^53.
//
//   const c = new TetherClient({url, token, deviceId});
//   c.onpush = (push) => { ... };        // each push once, in seq order per lane
//   c.onstate = (state, detail) => { ... };
//   c.start();
//   c.send("route", bytes);              // an uplink: resent until acknowledged

"use strict";

// ---- protobuf: the wire format (varints, lengths, tags) ----

const WIRE_VARINT = 0;
const WIRE_64 = 1;
const WIRE_LEN = 2;
const WIRE_32 = 5;

// Message schemas: field number -> [name, kind, schema of a sub-message].
// Kinds: "uint" (uint32/uint64/enum), "bool", "string", "bytes", "msg",
// "msgs" (repeated message). A oneof is a set of "msg" fields; the decoder
// names the one it found in `body`.
const S = {};
S.SeqRange = { 1: ["first", "uint"], 2: ["last", "uint"] };
S.Resume = {
  1: ["session_id", "uint"],
  2: ["resume_token", "bytes"],
  3: ["last_seq", "uint"],
  4: ["last_bulk_seq", "uint"],
};
S.Login = {
  1: ["token", "string"],
  2: ["device_id", "string"],
  3: ["platform", "uint"],
  4: ["protocol_version", "uint"],
  5: ["resume", "msg", S.Resume],
};
S.Ping = { 1: ["client_time_ms", "uint"] };
S.Send = { 1: ["client_msg_id", "string"], 2: ["route", "string"], 3: ["payload", "bytes"] };
S.Ack = { 1: ["up_to_seq", "uint"], 2: ["lane", "uint"], 3: ["ranges", "msgs", S.SeqRange] };
S.Room = { 1: ["room", "string"] };
S.Close = {
  1: ["code", "uint"],
  2: ["reason", "string"],
  3: ["reconnect_to", "string"],
  4: ["reconnect_after_ms", "uint"],
};
S.Refresh = { 1: ["token", "string"] };
S.ClientFrame = {
  1: ["request_id", "uint"],
  2: ["login", "msg", S.Login],
  3: ["ping", "msg", S.Ping],
  4: ["send", "msg", S.Send],
  5: ["ack", "msg", S.Ack],
  6: ["join", "msg", S.Room],
  7: ["leave", "msg", S.Room],
  8: ["close", "msg", S.Close],
  9: ["refresh", "msg", S.Refresh],
};
S.ResumeResult = {
  1: ["code", "uint"],
  2: ["first_seq", "uint"],
  3: ["first_bulk_seq", "uint"],
  4: ["replayed", "uint"],
};
S.LoginOk = {
  1: ["session_id", "uint"],
  2: ["heartbeat_interval_ms", "uint"],
  3: ["node_id", "string"],
  4: ["server_time_ms", "uint"],
  5: ["protocol_version", "uint"],
  6: ["max_frame_len", "uint"],
  7: ["user_id", "string"],
  8: ["resume_token", "bytes"],
  9: ["resume", "msg", S.ResumeResult],
  10: ["next_uplink_seq", "uint"],
  11: ["token_exp_ms", "uint"],
};
S.Pong = { 1: ["client_time_ms", "uint"], 2: ["server_time_ms", "uint"] };
S.SendAck = {
  1: ["client_msg_id", "string"],
  2: ["server_msg_id", "uint"],
  3: ["code", "uint"],
  4: ["seq", "uint"],
  5: ["duplicate", "bool"],
};
S.Push = {
  1: ["seq", "uint"],
  2: ["message_id", "string"],
  3: ["payload", "bytes"],
  4: ["source", "string"],
  5: ["room", "string"],
  6: ["lane", "uint"],
};
S.RoomOk = { 1: ["room", "string"], 2: ["joined", "bool"] };
S.Error = { 1: ["code", "uint"], 2: ["message", "string"] };
S.RefreshOk = { 1: ["token_exp_ms", "uint"], 2: ["server_time_ms", "uint"] };
S.Gap = { 1: ["lane", "uint"], 2: ["first_seq", "uint"], 3: ["last_seq", "uint"] };
S.ServerFrame = {
  1: ["request_id", "uint"],
  2: ["login_ok", "msg", S.LoginOk],
  3: ["pong", "msg", S.Pong],
  4: ["send_ack", "msg", S.SendAck],
  5: ["push", "msg", S.Push],
  6: ["room_ok", "msg", S.RoomOk],
  7: ["close", "msg", S.Close],
  8: ["error", "msg", S.Error],
  9: ["refresh_ok", "msg", S.RefreshOk],
  10: ["gap", "msg", S.Gap],
};

const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

function pushVarint(out, n) {
  // n: a non-negative integer below 2^53.
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
}

function encode(schema, msg) {
  const out = [];
  for (const [no, [name, kind, sub]] of Object.entries(schema)) {
    const v = msg[name];
    if (v === undefined || v === null) continue;
    const tag = (wire) => pushVarint(out, Number(no) * 8 + wire);
    const bytes = (b) => {
      tag(WIRE_LEN);
      pushVarint(out, b.length);
      for (const x of b) out.push(x);
    };
    switch (kind) {
      case "uint":
        if (v !== 0) {
          tag(WIRE_VARINT);
          pushVarint(out, v);
        }
        break;
      case "bool":
        if (v) {
          tag(WIRE_VARINT);
          out.push(1);
        }
        break;
      case "string":
        if (v.length) bytes(utf8.encode(v));
        break;
      case "bytes":
        if (v.length) bytes(v);
        break;
      case "msg":
        bytes(encode(sub, v));
        break;
      case "msgs":
        for (const m of v) bytes(encode(sub, m));
        break;
    }
  }
  return Uint8Array.from(out);
}

class Reader {
  constructor(buf) {
    this.buf = buf;
    this.pos = 0;
  }
  varint() {
    let n = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw new Error("truncated varint");
      const b = this.buf[this.pos++];
      n += (b & 0x7f) * scale;
      if (b < 0x80) return n;
      scale *= 0x80;
    }
    throw new Error("varint too long");
  }
  take(n) {
    if (n > this.buf.length - this.pos) throw new Error("truncated field");
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }
}

function decode(schema, buf) {
  const r = new Reader(buf);
  const msg = {};
  while (r.pos < buf.length) {
    const key = r.varint();
    const no = Math.floor(key / 8);
    const wire = key % 8;
    const field = schema[no];
    let raw;
    switch (wire) {
      case WIRE_VARINT:
        raw = r.varint();
        break;
      case WIRE_64:
        raw = r.take(8);
        break;
      case WIRE_LEN:
        raw = r.take(r.varint());
        break;
      case WIRE_32:
        raw = r.take(4);
        break;
      default:
        throw new Error("unknown wire type " + wire);
    }
    if (!field) continue; // unknown fields are ignored, as protobuf requires
    const [name, kind, sub] = field;
    switch (kind) {
      case "uint":
        msg[name] = raw;
        break;
      case "bool":
        msg[name] = raw !== 0;
        break;
      case "string":
        msg[name] = utf8Strict.decode(raw);
        break;
      case "bytes":
        msg[name] = raw.slice();
        break;
      case "msg":
        msg[name] = decode(sub, raw);
        if (schema === S.ServerFrame || schema === S.ClientFrame) msg.body = name;
        break;
      case "msgs":
        (msg[name] = msg[name] || []).push(decode(sub, raw));
        break;
    }
  }
  return msg;
}

// ---- the protocol ----

const Code = {
  OK: 0,
  FRAME_TOO_LARGE: 1001,
  SLOW_CONSUMER: 3002,
  HEARTBEAT_TIMEOUT: 3004,
  ACK_TIMEOUT: 3007,
  NORMAL_CLOSE: 4000,
  REPLACED: 4001,
  KICKED: 4002,
  SERVER_DRAINING: 4003,
  CONNECTION_LOST: 4004,
  UPSTREAM_UNAVAILABLE: 5001,
  RESUME_GAP: 6000,
  RESUME_EXPIRED: 6001,
  RESUME_REJECTED: 6002,
};
const LANES = [0, 1]; // interactive, bulk
const PLATFORM_WEB = 3;
// Closes after which reconnecting is wrong (PROTOCOL.md, section 14):
// another login took the device, or the upstream kicked it.
const FINAL = new Set([Code.NORMAL_CLOSE, Code.REPLACED, Code.KICKED]);

class TetherClient {
  constructor({ url, token, deviceId, subprotocol = "tether.v1" }) {
    this.url = url;
    this.token = token;
    this.deviceId = deviceId;
    this.subprotocol = subprotocol;
    // Stored across connections (PROTOCOL.md 11.3).
    this.sessionId = 0;
    this.resumeToken = new Uint8Array();
    this.last = [0, 0];
    this.unacked = new Map(); // client_msg_id -> {route, payload}
    this.nextMsg = 1;
    // Per connection.
    this.ws = null;
    this.online = false;
    this.pendingAcks = [0, 0];
    this.ackTimer = null;
    this.pingTimer = null;
    this.backoff = 250;
    this.stopped = false;
    this.onpush = () => {};
    this.onstate = () => {};
    this.onuplinkack = () => {};
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  /** Sends an uplink; it is sent again after a reconnect until the gateway acknowledges it. */
  send(route, payload) {
    const id = "web-" + Date.now().toString(36) + "-" + this.nextMsg++;
    const m = { route, payload: payload instanceof Uint8Array ? payload : utf8.encode(payload) };
    this.unacked.set(id, m);
    // Before LoginOk it waits: loggedIn sends every unacknowledged uplink.
    if (this.online) this.write({ send: { client_msg_id: id, ...m } });
    return id;
  }

  /** Logs out: the session ends (a dropped socket would leave it waiting for a resume). */
  close() {
    this.stopped = true;
    this.write({ close: { code: Code.NORMAL_CLOSE } });
  }

  /** Drops the connection as a network would, leaving the session for a resume. */
  drop() {
    if (this.ws) this.ws.close();
  }

  connect() {
    const ws = new WebSocket(this.url, this.subprotocol);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.onstate("connecting", this.url);
    ws.onopen = () => {
      const login = {
        token: this.token,
        device_id: this.deviceId,
        platform: PLATFORM_WEB,
        protocol_version: 1,
      };
      if (this.sessionId) {
        login.resume = {
          session_id: this.sessionId,
          resume_token: this.resumeToken,
          last_seq: this.last[0],
          last_bulk_seq: this.last[1],
        };
      }
      this.write({ login });
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer)) return; // the gateway sends binary messages only
      let f;
      try {
        f = decode(S.ServerFrame, new Uint8Array(ev.data));
      } catch (e) {
        this.onstate("error", "an undecodable frame: " + e.message);
        ws.close();
        return;
      }
      this.handle(f);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.online = false;
      clearInterval(this.pingTimer);
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
      this.pendingAcks = [0, 0];
      if (this.stopped) {
        this.onstate("closed", ev.code);
        return;
      }
      // Exponential backoff with jitter (PROTOCOL.md section 13).
      const wait = this.retryAfter ?? this.backoff * (0.5 + Math.random());
      this.retryAfter = undefined;
      this.backoff = Math.min(this.backoff * 2, 30000);
      this.onstate("disconnected", Math.round(wait));
      setTimeout(() => this.connect(), wait);
    };
  }

  handle(f) {
    switch (f.body) {
      case "login_ok":
        return this.loggedIn(f.login_ok);
      case "push":
        return this.pushed(f.push);
      case "gap": {
        const g = f.gap;
        const lane = g.lane || 0;
        if ((g.last_seq || 0) > this.last[lane]) {
          this.onstate("gap", g);
          this.last[lane] = g.last_seq;
          this.ackSoon(lane);
        }
        return;
      }
      case "send_ack": {
        const a = f.send_ack;
        if (!a.code) this.unacked.delete(a.client_msg_id);
        this.onuplinkack(a);
        return;
      }
      case "close": {
        const c = f.close;
        if (FINAL.has(c.code)) this.stopped = true;
        if (c.reconnect_after_ms) this.retryAfter = c.reconnect_after_ms * (1 + Math.random() / 2);
        this.onstate("close", c);
        return;
      }
      case "error":
        this.onstate("error", f.error);
        return;
      default:
        return; // pong, room_ok, refresh_ok: nothing to do here
    }
  }

  loggedIn(ok) {
    const r = ok.resume;
    if (!r || r.code === Code.RESUME_EXPIRED || r.code === Code.RESUME_REJECTED) {
      // A new session: seqs start again at 1.
      this.last = [0, 0];
    }
    this.sessionId = ok.session_id;
    this.resumeToken = ok.resume_token || new Uint8Array();
    this.backoff = 250;
    this.online = true;
    const beat = ok.heartbeat_interval_ms || 30000;
    this.pingTimer = setInterval(() => this.write({ ping: { client_time_ms: Date.now() } }), beat);
    this.onstate("online", { node: ok.node_id, session: ok.session_id, resume: r && r.code });
    for (const [id, m] of this.unacked) this.write({ send: { client_msg_id: id, ...m } });
  }

  pushed(p) {
    const lane = p.lane || 0;
    const seq = p.seq || 0;
    if (seq > this.last[lane]) {
      this.last[lane] = seq;
      this.onpush(p);
    }
    // A duplicate (seq at or below the last) is acknowledged again.
    this.ackSoon(lane);
  }

  // One Ack per lane after 16 pushes or 500 ms (PROTOCOL.md 11.4).
  ackSoon(lane) {
    this.pendingAcks[lane]++;
    if (this.pendingAcks[lane] >= 16) return this.flushAcks();
    if (!this.ackTimer) this.ackTimer = setTimeout(() => this.flushAcks(), 500);
  }

  flushAcks() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    for (const lane of LANES) {
      if (this.pendingAcks[lane]) {
        this.pendingAcks[lane] = 0;
        this.write({ ack: { up_to_seq: this.last[lane], lane } });
      }
    }
  }

  write(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(encode(S.ClientFrame, frame));
    }
  }
}

if (typeof module !== "undefined") module.exports = { TetherClient, encode, decode, S, Code };
