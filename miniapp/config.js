// Where the mini-program finds server A (the edge). Change `baseUrl` to your edge's https address; it must be a
// request合法域名 and (as wss://) a socket合法域名 of the mini-program (docs/miniapp.md).
//
// For WeChat DevTools against a local `make demo`: baseUrl 'http://127.0.0.1:8080', tick 不校验合法域名 in
// 详情 → 本地设置, and set devUser (the demo edge has dev_login on but no [miniapp] AppID, so wx.login sign-in
// would answer 501). Leave devUser empty for a real deployment: it signs in with wx.login.
module.exports = {
  baseUrl: 'https://claw.example.com',
  devUser: '',
};
