// A realtime subscription ends when its reason to exist does: a member removed from the
// bucket stops receiving, and a socket whose token is revoked is closed (code 4001).
'use strict'
const WebSocket = require('ws')

const base = process.env.KM_URL
const url = base.replace(/^http/, 'ws') + '/primus'
const publicId = process.env.KM_PUBLIC_ID
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// A socket subscribed to the bucket, counting the statuses it receives.
function watch (token) {
  const w = { statuses: 0, closed: null }
  const ws = new WebSocket(`${url}?token=${token}`)
  ws.on('open', () => ws.send(JSON.stringify({ action: 'sub', public_id: publicId, filters: ['status'] })))
  ws.on('message', () => { w.statuses += 1 })
  ws.on('close', (code) => { w.closed = code })
  ws.on('error', () => {})
  w.ws = ws
  return w
}

async function api (method, path, token, body) {
  const answer = await fetch(`${base}${path}`, {
    method, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: body && JSON.stringify(body)
  })
  if (!answer.ok) throw new Error(`${method} ${path}: HTTP ${answer.status}: ${await answer.text()}`)
}

async function until (what, cond, ms) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) { if (cond()) return; await sleep(200) }
  throw new Error(`${what}: not within ${ms} ms`)
}

(async () => {
  const member = watch(process.env.KM_MEMBER_TOKEN)
  const revoked = watch(process.env.KM_REVOKED_TOKEN)
  await until('both sockets get statuses', () => member.statuses > 0 && revoked.statuses > 0, 10000)
  await api('POST', `/api/bucket/${process.env.KM_BUCKET_ID}/remove_user`, process.env.KM_OWNER_TOKEN, { email: process.env.KM_MEMBER_EMAIL })
  await api('POST', '/api/oauth/revoke', process.env.KM_REVOKED_TOKEN)
  const removedAt = Date.now()
  await until('the revoked token\'s socket is closed with 4001', () => revoked.closed === 4001, 15000)
  // Within one re-check period the removed member stops receiving.
  await sleep(Math.max(0, 12000 - (Date.now() - removedAt)))
  const before = member.statuses
  await sleep(4000)
  if (member.statuses !== before) throw new Error(`the removed member still receives statuses (${member.statuses - before} in 4 s)`)
  if (member.closed !== null) throw new Error(`the member's socket was closed (${member.closed}); only its subscription should end`)
  member.ws.close()
  console.log(`realtime revocation: ok (revoked socket closed ${revoked.closed}, removed member silent)`)
  process.exit(0)
})().catch((e) => { console.error('realtime revocation: FAIL', e.message); process.exit(1) })
