// The app: one client (session + socket + conversation, utils/client.js) for all pages, so an answer keeps
// streaming while the user looks at the history, and every unfinished answer is resumed when the mini-program
// comes back from the background (onShow).
const config = require('./config');
const { createClient } = require('./utils/client');

App({
  globalData: { client: null },

  onLaunch() {
    this.globalData.client = createClient({ wx, baseUrl: config.baseUrl, devUser: config.devUser });
    this.globalData.client.start();
  },

  onShow() {
    if (this.globalData.client) this.globalData.client.foreground();
  },
});
