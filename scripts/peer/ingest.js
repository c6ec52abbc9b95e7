#!/usr/bin/env node
// The benchmark peer of scripts/bench.py: the smallest ingest that km-loadgen runs
// against, on the original Keymetrics backend's stack (npm `ws`, JSON.parse, npm
// `fast-json-patch`), with no storage. It answers like km does:
//   POST /api/node/verifyPM2               -> {active, pending, disabled, endpoints: {ws, web}}
//   GET  /interaction (websocket)          -> `status` kept per server, `status:patch`
//                                             applied in place (a failure asks for
//                                             `status:resend`), other channels counted
//                                             and their last 1,000 payloads kept
//   GET  /api/bucket/:id/data/status[?server_name=]
//                                          -> [{server_name, internal_ip, online, last_update, data}]
//   GET  /healthz                          -> {servers, frames, statuses, patches, patches_failed, ...}
// Any keys and any bearer token are accepted.
//
// Usage: node scripts/peer/ingest.js --listen 127.0.0.1:PORT   (or PEER_LISTEN=host:port)
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');
const { applyPatch } = require('fast-json-patch');

const argAt = process.argv.indexOf('--listen');
const listen = (argAt > 0 && process.argv[argAt + 1]) || process.env.PEER_LISTEN || '127.0.0.1:3900';
const sep = listen.lastIndexOf(':');
const host = listen.slice(0, sep);
const port = Number(listen.slice(sep + 1));

// km's answers and frames
const STATUS_RESEND = '{"channel":"status:resend","payload":{}}';
const MAX_FRAME_BYTES = 16 << 20;
const RING_SIZE = 1000;

// server name -> {status, sockets, last_update}
const servers = new Map();
const counts = { frames: 0, statuses: 0, patches: 0, patches_failed: 0, events: 0, malformed_frames: 0 };
const ring = new Array(RING_SIZE);
let ringAt = 0;

function json(res, code, body) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(code, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function view(name, s) {
  const st = s.status || {};
  return {
    server_name: name,
    internal_ip: typeof st.internal_ip === 'string' ? st.internal_ip : null,
    online: s.sockets > 0,
    last_update: s.last_update,
    data: st.data || {},
  };
}

function onFrame(ws, server, text) {
  counts.frames++;
  let frame;
  try {
    frame = JSON.parse(text);
  } catch (e) {
    counts.malformed_frames++;
    return;
  }
  if (frame === null || typeof frame !== 'object' || frame.payload === undefined) {
    counts.malformed_frames++;
    return;
  }
  switch (frame.channel) {
    case 'status':
      if (frame.payload === null || typeof frame.payload !== 'object') {
        counts.malformed_frames++;
        return;
      }
      server.status = frame.payload;
      server.last_update = Date.now();
      counts.statuses++;
      return;
    case 'status:patch':
      counts.patches++;
      try {
        if (!server.status || !Array.isArray(frame.payload)) throw new Error('nothing to patch');
        server.status = applyPatch(server.status, frame.payload, false, true).newDocument;
        server.last_update = Date.now();
      } catch (e) {
        counts.patches_failed++;
        ws.send(STATUS_RESEND);
      }
      return;
    default:
      // the stand-in for km's event writer queue
      counts.events++;
      ring[ringAt] = frame.payload;
      ringAt = (ringAt + 1) % RING_SIZE;
  }
}

const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES });

wss.on('connection', (ws, name) => {
  let server = servers.get(name);
  if (!server) {
    server = { status: null, sockets: 0, last_update: Date.now() };
    servers.set(name, server);
  }
  server.sockets++;
  // pings from the agent are answered by ws itself (autoPong)
  // text and binary frames alike are UTF-8 JSON, as km reads them
  ws.on('message', (data) => onFrame(ws, server, data.toString()));
  ws.on('close', () => {
    server.sockets--;
  });
  ws.on('error', () => {});
});

const httpServer = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://peer');
  if (req.method === 'POST' && url.pathname === '/api/node/verifyPM2') {
    req.resume(); // the body (keys, machine data) is not checked
    req.on('end', () =>
      json(res, 200, {
        active: true,
        pending: false,
        disabled: false,
        endpoints: { ws: `ws://${listen}/interaction`, web: `http://${listen}` },
      }),
    );
    return;
  }
  if (req.method === 'GET') {
    const m = /^\/api\/bucket\/[^/]+\/data\/status$/.exec(url.pathname);
    if (m) {
      const only = url.searchParams.get('server_name');
      const out = [];
      if (only !== null) {
        const s = servers.get(only);
        if (s) out.push(view(only, s));
      } else {
        for (const [name, s] of servers) out.push(view(name, s));
      }
      return json(res, 200, out);
    }
    if (url.pathname === '/healthz') {
      return json(res, 200, { status: 'ok', servers: servers.size, ...counts, events_kept: Math.min(counts.events, RING_SIZE) });
    }
  }
  json(res, 404, { msg: `no route ${req.method} ${url.pathname}` });
});

httpServer.on('upgrade', (req, socket, head) => {
  const name = req.headers['x-km-server'];
  if (new URL(req.url, 'http://peer').pathname !== '/interaction' || !name) {
    socket.end('HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, name));
});

httpServer.listen(port, host, () => console.error(`peer ingest listening on ${listen}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
