#!/usr/bin/env node
// Drive the mini-program's own client code (utils/client.js: api, socket, chat) against a running edge, with a
// small `wx` built on Node (fetch, the `ws` package): sign in (dev login), ask, cut the socket mid-answer, check
// that the resumed answer equals the edge's record (nothing lost or repeated), stop a second answer, read the
// history. For a local `make demo` (dev_login on):
//
//   node scripts/live-check.js http://127.0.0.1:8080 alice
//
// Exit 0 when every check passed. Not part of the mini-program (packOptions.ignore); `make test` runs it
// from tests/e2e/test_miniapp_live.py against the real system.
'use strict';

const WebSocket = require('ws');
const { createClient } = require('../utils/client');

const [baseUrl = 'http://127.0.0.1:8080', devUser = 'alice'] = process.argv.slice(2);

function nodeWx() {
  const storage = new Map();
  return {
    request(o) {
      const init = { method: o.method || 'GET', headers: o.header || {} };
      if (o.data !== undefined && init.method !== 'GET') init.body = JSON.stringify(o.data);
      fetch(o.url, init).then(async (res) => {
        const body = await res.text();
        let data = body;
        try { data = JSON.parse(body); } catch (e) { /* not JSON */ }
        o.success({ statusCode: res.status, data, header: {} });
      }, (e) => o.fail({ errMsg: 'request:fail ' + e.message }));
    },
    login(o) { o.fail({ errMsg: 'login:fail no wx.login outside WeChat' }); },
    connectSocket(o) {
      const ws = new WebSocket(o.url);
      const task = {
        ws,
        onOpen: (f) => ws.on('open', () => f({})),
        onMessage: (f) => ws.on('message', (d) => f({ data: d.toString() })),
        onError: (f) => ws.on('error', (e) => f({ errMsg: String(e.message) })),
        onClose: (f) => ws.on('close', (code, reason) => f({ code, reason: reason.toString() })),
        send: (m) => ws.send(m.data),
        close: (m) => { try { ws.close((m && m.code) || 1000, m && m.reason); } catch (e) { ws.terminate(); } },
      };
      sockets.push(task);
      return task;
    },
    getStorageSync: (k) => (storage.has(k) ? storage.get(k) : ''),
    setStorageSync: (k, v) => storage.set(k, v),
    removeStorageSync: (k) => storage.delete(k),
  };
}

const sockets = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, fn, ms) {
  const end = Date.now() + (ms || 30000);
  while (Date.now() < end) {
    if (fn()) return;
    await sleep(20);
  }
  throw new Error('timed out waiting for ' + what);
}
function check(ok, what) {
  console.log((ok ? 'ok   ' : 'FAIL ') + what);
  if (!ok) process.exitCode = 1;
}

(async () => {
  const client = createClient({ wx: nodeWx(), baseUrl, devUser });
  await client.start();
  await until('the socket to open', () => client.socket.state === 'open');
  check(client.api.uid === 'web.' + devUser, `signed in as ${client.api.uid}`);
  check(client.chat.maxQuestion > 0, `max_question ${client.chat.maxQuestion}`);
  check(!client.ask('x'.repeat(client.chat.maxQuestion + 1)).ok, 'an over-long question is refused locally');

  // 1. cut the socket after the first delta; the answer must come back whole
  const a = client.ask('请写一段较长的介绍，分几段，包含一个列表和一段代码。');
  const msgA = client.chat.messages.find((m) => m.key === a.key);
  await until('the first delta', () => msgA.seq >= 1 || msgA.state === 'done');
  const cutAt = msgA.seq;
  sockets[sockets.length - 1].ws.terminate(); // like a network drop: close code 1006
  await until('the answer to finish', () => ['done', 'error', 'cancelled'].includes(msgA.state), 60000);
  check(sockets.length >= 2, `reconnected (${sockets.length} sockets; cut after seq ${cutAt})`);
  const rec = await client.api.task(a.frame.id);
  check(msgA.state === 'done' && rec.status === 'ok', `answer done (${rec.status})`);
  const streamed = msgA.text;
  check(streamed === rec.answer, `shown text equals the edge's record (${rec.answer.length} chars, ${client.chat.duplicates} duplicates dropped)`);

  // 2. stop an answer mid-stream
  const b = client.ask('再写一段很长的文字，越长越好。');
  const msgB = client.chat.messages.find((m) => m.key === b.key);
  await until('a delta of the second answer', () => msgB.seq >= 1 || msgB.state === 'done');
  client.stop(b.key);
  await until('the stop', () => ['done', 'error', 'cancelled'].includes(msgB.state), 30000);
  check(msgB.state === 'cancelled', `stopped: ${msgB.state}`);

  // 3. history
  const tasks = await client.api.tasks(undefined, 5);
  check(tasks.some((t) => t.task === a.frame.id), `history has the first task (${tasks.length} shown)`);
  const older = await client.api.tasks(tasks[tasks.length - 1].ts, 5);
  check(!older.some((t) => tasks.some((u) => u.task === t.task)), 'the next page does not repeat the first');

  check(sockets.filter((t) => t.ws.readyState === WebSocket.OPEN).length === 1, 'one socket open');
  await client.logout();
  process.exit(process.exitCode || 0);
})().catch((e) => {
  console.error('FAIL', e && e.message ? e.message : e);
  process.exit(1);
});
