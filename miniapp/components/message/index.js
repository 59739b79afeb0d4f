// One chat bubble. state: user | streaming | done | error | cancelled. An assistant's text is markdown, rendered
// into rich-text nodes by utils/markdown.js (escaped: no HTML from the answer ever passes). The chat page passes
// the answer already rendered as `blocks` (utils/stream.js: one rich-text each, only new blocks sent while it
// streams); without blocks (the detail page) the bubble renders `text` itself. Events: `stop`, `retry` (detail:
// {key}: the `msg-key` attribute).
const { toNodes } = require('../../utils/markdown');

Component({
  options: { addGlobalClass: true },

  properties: {
    msgKey: { type: String, value: '' }, // the bubble's key, echoed in the events
    role: { type: String, value: 'assistant' },
    state: { type: String, value: 'done' },
    text: { type: String, value: '' },
    blocks: { type: Array, value: [] }, // rich-text node arrays of the answer, rendered by the page's model
    note: { type: String, value: '' },
    error: { type: String, value: '' },
    stopping: { type: Boolean, value: false },
  },

  data: { nodes: [] },

  observers: {
    'text, role, blocks': function (text, role, blocks) {
      const own = role !== 'user' && !(blocks && blocks.length);
      if (own) this.setData({ nodes: toNodes(text) });
      else if (this.data.nodes.length) this.setData({ nodes: [] });
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
