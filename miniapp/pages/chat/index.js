// The chat page: bubbles from the shared client (utils/client.js), rendered by throttled setData; the composer
// refuses an empty or over-long question before sending and keeps the typed text.
Component({
  data: {
    messages: [],
    node: null,
    conn: { state: 'idle', text: '', error: '' },
    input: '',
    inputError: '',
    max: 8000,
    scrollTop: 0,
  },

  methods: {
    onLoad() {
      this.client = this.client || getApp().globalData.client;
      this.unsubscribe = this.client.subscribe((update) => {
        if (update.notice) {
          wx.showToast({ title: update.notice, icon: 'none' });
          delete update.notice;
        }
        update.max = this.client.chat.maxQuestion;
        update.scrollTop = this.data.scrollTop + 100000; // keep the newest text in view
        this.setData(update);
      });
    },

    onUnload() {
      if (this.unsubscribe) this.unsubscribe();
    },

    onInput(e) {
      const input = e.detail.value;
      const over = input.length > this.data.max;
      this.setData({ input, inputError: over ? `已输入 ${input.length} 字，超过上限 ${this.data.max} 字` : '' });
    },

    onSend() {
      const r = this.client.ask(this.data.input);
      if (!r.ok) {
        this.setData({ inputError: r.error }); // the text stays in the box
        return;
      }
      this.setData({ input: '', inputError: '' });
    },

    onStop(e) {
      this.client.stop(e.detail.key);
    },

    onRetry(e) {
      this.client.retry(e.detail.key);
    },

    onReconnect() {
      this.client.foreground();
    },
  },
});
