// Sign-in state (the uid shortened), the assistant's and the connection's state, 新对话 and 退出登录.
const { shortUid } = require('../../utils/format');

Component({
  data: { uid: '', signedIn: false, node: null, conn: { state: 'idle', text: '' }, busy: false, error: '' },

  methods: {
    onLoad() {
      this.client = this.client || getApp().globalData.client;
      this.unsubscribe = this.client.subscribe((u) => this.setData({ node: u.node, conn: u.conn }));
      this.refresh();
    },

    onShow() {
      this.refresh();
    },

    onUnload() {
      if (this.unsubscribe) this.unsubscribe();
    },

    refresh() {
      const api = this.client.api;
      this.setData({ uid: shortUid(api.uid), signedIn: api.signedIn });
    },

    onNewConversation() {
      this.client.newConversation();
      wx.showToast({ title: '已开始新对话', icon: 'none' });
      wx.switchTab({ url: '/pages/chat/index' });
    },

    async onLogin() {
      this.setData({ busy: true, error: '' });
      try {
        await this.client.api.login();
        await this.client.start();
      } catch (e) {
        this.setData({ error: e.message || '登录失败' });
      }
      this.setData({ busy: false });
      this.refresh();
    },

    async onLogout() {
      this.setData({ busy: true });
      await this.client.logout();
      this.setData({ busy: false });
      this.refresh();
    },
  },
});
