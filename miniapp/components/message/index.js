// One chat bubble. state: user | streaming | done | error | cancelled. An assistant's text is markdown, rendered
// into rich-text nodes by utils/markdown.js (escaped: no HTML from the answer ever passes). Events: `stop`,
// `retry` (detail: {key}: the `msg-key` attribute).
const { toNodes } = require('../../utils/markdown');

Component({
  options: { addGlobalClass: true },

  properties: {
    msgKey: { type: String, value: '' }, // the bubble's key, echoed in the events
    role: { type: String, value: 'assistant' },
    state: { type: String, value: 'done' },
    text: { type: String, value: '' },
    note: { type: String, value: '' },
    error: { type: String, value: '' },
    stopping: { type: Boolean, value: false },
  },

  data: { nodes: [] },

  observers: {
    'text, role': function (text, role) {
      this.setData({ nodes: role === 'user' ? [] : toNodes(text) });
    },
  },

  methods: {
    onStop() {
      if (!this.data.stopping) this.triggerEvent('stop', { key: this.data.msgKey });
    },
    onRetry() {
      this.triggerEvent('retry', { key: this.data.msgKey });
    },
    onCopy() {
      if (typeof wx !== 'undefined' && wx.setClipboardData) wx.setClipboardData({ data: this.data.text });
    },
  },
});
