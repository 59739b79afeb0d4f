// What the page tests share: a client on a fake wx and a hand-driven clock installed as getApp()'s, pages
// rendered by miniprogram-simulate, and a bounded wait for the simulated view. Jest gives each test file its own
// copy of this module, so `page` loads each path once per file (a path loaded twice renders nothing).
const path = require('path');
const simulate = require('miniprogram-simulate');
const { createClient } = require('../utils/client');
const { Clock, fakeWx, edgeRoutes, settle } = require('./helpers');

const ROOT = path.resolve(__dirname, '..');

function app() {
  const clock = new Clock();
  const nowS = () => Math.floor(clock.now() / 1000) + 1700000000;
  const fwx = fakeWx(edgeRoutes(nowS));
  let n = 0;
  const client = createClient({ wx: fwx, baseUrl: 'https://edge.example.com', random: () => 1, now: clock.now,
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, renderMs: 0,
    newId: () => (++n).toString(16).padStart(32, '0') });
  global.getApp = () => ({ globalData: { client } });
  return { clock, fwx, client };
}

// app() with the client started and its socket open (the edge's routes answered)
async function connected() {
  const made = app();
  await made.client.start();
  await settle();
  made.fwx.sockets[0].open();
  return made;
}

// the simulated view updates on a timer: wait for the condition, bounded
async function until(cond) {
  for (let i = 0; i < 200 && !cond(); i++) await simulate.sleep(5);
  return cond();
}

const loaded = new Map();
function page(name) {
  if (!loaded.has(name)) loaded.set(name, simulate.load(path.join(ROOT, 'pages', name, 'index'), { rootPath: ROOT }));
  const comp = simulate.render(loaded.get(name));
  comp.attach(document.createElement('parent-wrapper'));
  return comp;
}

module.exports = { ROOT, app, connected, until, page };
