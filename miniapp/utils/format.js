// Small pure helpers for the pages: time, task status, a shortened uid.
'use strict';

const STATUS = {
  pending: '排队中',
  accepted: '进行中',
  ok: '已完成',
  error: '出错',
  cancelled: '已停止',
};

function pad(n) {
  return n < 10 ? '0' + n : String(n);
}

// `ts` (ms since the epoch) as 14:05 (today), 03-12 14:05 (this year) or 2025-03-12 (earlier); local time.
function formatTime(ts, nowMs) {
  if (typeof ts !== 'number' || !isFinite(ts)) return '';
  const d = new Date(ts);
  const now = new Date(nowMs === undefined ? Date.now() : nowMs);
  const hm = pad(d.getHours()) + ':' + pad(d.getMinutes());
  if (d.getFullYear() === now.getFullYear() && d.getMonth() === now.getMonth() && d.getDate() === now.getDate()) {
    return hm;
  }
  if (d.getFullYear() === now.getFullYear()) return pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + hm;
  return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate());
}

function statusText(status) {
  return STATUS[status] || String(status || '');
}

// mp.oAbcdefghijklmnopqrstuvwxyz -> mp.oAbcd…wxyz (an openid is long and means nothing to a person)
function shortUid(uid) {
  if (typeof uid !== 'string' || !uid) return '';
  const dot = uid.indexOf('.');
  const prefix = dot >= 0 ? uid.slice(0, dot + 1) : '';
  const rest = uid.slice(prefix.length);
  return rest.length <= 12 ? uid : prefix + rest.slice(0, 5) + '…' + rest.slice(-4);
}

// One line of a question for a list: whitespace collapsed, cut at `max` characters.
function oneLine(text, max) {
  const s = String(text || '').replace(/\s+/g, ' ').trim();
  const m = max || 60;
  return s.length > m ? s.slice(0, m) + '…' : s;
}

module.exports = { formatTime, statusText, shortUid, oneLine, STATUS };
