// One task in full (GET /api/tasks/{id}): the question and the whole answer, markdown rendered.
const { formatTime, statusText } = require('../../utils/format');

const STATE = { ok: 'done', error: 'error', cancelled: 'cancelled', pending: 'streaming', accepted: 'streaming' };

Component({
  data: { task: null, state: 'done', time: '', status: '', error: '', loading: true },

  methods: {
    onLoad(query) {
      this.client = this.client || getApp().globalData.client;
      this.id = query && query.id;
      return this.load();
    },

    onPullDownRefresh() {
      return this.load().then(() => wx.stopPullDownRefresh());
    },

    async load() {
      this.setData({ loading: true, error: '' });
      try {
        const t = await this.client.api.task(this.id);
        this.setData({
          task: t,
          loading: false,
          state: STATE[t.status] || 'done',
          time: formatTime(t.ts),
          status: statusText(t.status),
          answerError: t.error && t.error.message ? t.error.message : '',
        });
      } catch (e) {
        this.setData({ loading: false, error: e.message || '加载失败' });
      }
    },

    // a running answer: stop it from here too
    onStop() {
      if (this.data.task) this.client.socket.send({ type: 'stop', task: this.data.task.task });
      this.setData({ state: 'streaming' });
    },

    onRetry() {
      if (this.data.task) {
        this.client.ask(this.data.task.text);
        wx.switchTab({ url: '/pages/chat/index' });
      }
    },
  },
});
