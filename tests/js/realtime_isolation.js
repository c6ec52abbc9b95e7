// /primus hands a bucket's events to its members only: a member's token receives the
// linked server's status; a stranger's token subscribing to the same bucket receives
// nothing; no token is refused with 401 at the upgrade.
'use strict';
const WebSocket = require('ws');

const url = process.env.KM_URL.replace(/^http/, 'ws') + '/primus';
const publicId = process.env.KM_PUBLIC_ID;

function listen(token, ms) {
  return new Promise((resolve, reject) => {
    const got = [];
    const ws = new WebSocket(token ? `${url}?token=${token}` : url);
    ws.on('unexpected-response', (_req, res) => resolve({ refused: res.statusCode, got }));
    ws.on('error', reject);
    ws.on('open', () => ws.send(JSON.stringify({ action: 'sub', public_id: publicId, filters: ['status'] })));
    ws.on('message', (data) => got.push(JSON.parse(data.toString())));
    setTimeout(() => { ws.terminate(); resolve({ got }); }, ms);
  });
}

(async () => {
  const none = await listen(null, 2000);
  if (none.refused !== 401) throw new Error(`no token: expected 401, got ${JSON.stringify(none)}`);
  const [member, stranger] = await Promise.all([listen(process.env.KM_MEMBER_TOKEN, 4000), listen(process.env.KM_OUTSIDER_TOKEN, 4000)]);
  const statuses = member.got.filter((m) => m.data && m.data[1] && m.data[1].status);
  if (!statuses.length) throw new Error(`member got no status in 4 s: ${JSON.stringify(member).slice(0, 500)}`);
  if (stranger.got.length) throw new Error(`stranger got ${stranger.got.length} messages: ${JSON.stringify(stranger.got[0]).slice(0, 300)}`);
  console.log(`realtime isolation: ok (member got ${statuses.length} statuses, stranger none)`);
})().catch((e) => { console.error('realtime isolation: FAIL', e.message); process.exit(1); });
