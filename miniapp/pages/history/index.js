// The user's questions from GET /api/tasks, newest first, 20 a page (`before` = the oldest `ts` shown); tap one to
// read the whole answer (pages/detail).
const { formatTime, statusText, oneLine } = require('../../utils/format');

const PAGE = 20;

function item(t) {
  return { id: t.task, title: oneLine(t.text, 60), status: t.status, statusText: statusText(t.status),
    time: formatTime(t.ts), ts: t.ts };
}

Component({
  data: { items: [], loading: false, done: false, error: '' },

  methods: {
    onLoad() {
      this.client = this.client || getApp().globalData.client;
      return this.reload();
    },

    onShow() {
      if (this.loaded) return this.reload();
      return null;
    },

    onPullDownRefresh() {
      return this.reload().then(() => wx.stopPullDownRefresh());
    },

    onReachBottom() {
      return this.more();
    },

    reload() {
      this.setData({ items: [], done: false, error: '' });
      return this.more();
    },

    async more() {
      if (this.data.loading || this.data.done) return;
      this.setData({ loading: true, error: '' });
      const items = this.data.items;
      const before = items.length ? items[items.length - 1].ts : undefined;
      try {
        const tasks = await this.client.api.tasks(before, PAGE);
        this.loaded = true;
        this.setData({ items: items.concat(tasks.map(item)), done: tasks.length < PAGE, loading: false });
      } catch (e) {
        this.setData({ loading: false, error: e.message || '加载失败' });
      }
    },

    onTap(e) {
      wx.navigateTo({ url: '/pages/detail/index?id=' + e.currentTarget.dataset.id });
    },
  },
});
