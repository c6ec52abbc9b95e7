'use strict'
// The official PM2 Plus API client, `@pm2/js-api` 0.8.1, unmodified, against km.
// Run by tests/tests/js_api.rs (through `run_node_script`, NODE_PATH = the e2e node_modules).
//
// It signs in as a script would (standalone strategy: a refresh token and any client id,
// exchanged at POST /api/oauth/token), then checks that
//   - km.bucket.retrieveAll() lists the bucket,
//   - km.data.status.retrieve() lists the linked server running the app,
//   - km.data.logs.retrieve() answers an array (holding KM_LOG_NEEDLE when set),
//   - km.actions.triggerPM2Action() restarts the app (restart_time goes up),
//   - km.realtime.subscribe() + km.realtime.on('<public_id>:*:status') gets a status event
//     of the server within 3 s,
//   - km.bucket.alert.* create, list, get, update, sample and delete a metric alert rule,
//     updateWebhooks answers a signing secret, km.bucket.setNotificationState mutes the
//     user's mail, and km.data.notifications.list lists the sample's delivery.
// Every check runs (after the first, which proves the sign-in) and prints one line; the
// script exits 1 naming every check that failed, 0 when all passed.
//
// Environment: KM_URL, KM_REFRESH_TOKEN, KM_BUCKET_ID, KM_SERVER_NAME, KM_APP_NAME, and
// optionally KM_LOG_NEEDLE. DEBUG=kmjs* shows the client's own traces.

const Keymetrics = require('@pm2/js-api')

const log = (msg) => console.log(`js_api: ${msg}`)

function required (name) {
  const value = process.env[name]
  if (!value) {
    console.error(`js_api: missing environment variable ${name}`)
    process.exit(2)
  }
  return value
}

const KM_URL = required('KM_URL')
const REFRESH_TOKEN = required('KM_REFRESH_TOKEN')
const BUCKET_ID = required('KM_BUCKET_ID')
const SERVER = required('KM_SERVER_NAME')
const APP = required('KM_APP_NAME')
const LOG_NEEDLE = process.env.KM_LOG_NEEDLE || ''

const STEP_TIMEOUT_MS = 15000
const RESTART_TIMEOUT_MS = 20000
const SUBSCRIBE_TIMEOUT_MS = 5000
const REALTIME_STATUS_MS = 3000

// A failed check of this script: its message says it all (no stack).
class CheckFailed extends Error {}

// A rejection of the client is an Error, or the HTTP response itself for a non-401 error
// (network.js rejects with `error.response`).
function describe (e) {
  if (e instanceof CheckFailed) return e.message
  const res = e && e.response ? e.response : e
  if (res && typeof res.status === 'number' && res.config) {
    const method = (res.config.method || '').toUpperCase()
    const url = `${res.config.baseURL || ''}${res.config.url || ''}`
    return `HTTP ${res.status} on ${method} ${url}: ${JSON.stringify(res.data)}`
  }
  if (e instanceof Error) return e.stack || e.message
  return JSON.stringify(e)
}

const show = (v) => {
  const s = JSON.stringify(v)
  return s && s.length > 600 ? `${s.slice(0, 600)}… (${s.length} chars)` : s
}

function withTimeout (promise, ms, what) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new CheckFailed(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const failures = []

// Runs one named check; `fn` returns a short detail for the progress line.
async function check (name, fn, timeoutMs = STEP_TIMEOUT_MS) {
  const t0 = Date.now()
  try {
    const detail = await withTimeout(Promise.resolve().then(fn), timeoutMs, name)
    log(`ok   ${name}${detail ? ` — ${detail}` : ''} (${Date.now() - t0} ms)`)
    return true
  } catch (e) {
    failures.push(name)
    log(`FAIL ${name}: ${describe(e)} (${Date.now() - t0} ms)`)
    return false
  }
}

function assert (cond, message) {
  if (!cond) throw new CheckFailed(message)
}

function finish () {
  if (failures.length > 0) {
    log(`${failures.length} check(s) failed: ${failures.join('; ')}`)
    process.exit(1)
  }
  log('all checks passed')
  process.exit(0)
}

async function serverEntry (km) {
  const res = await km.data.status.retrieve(BUCKET_ID)
  assert(Array.isArray(res.data), `data.status.retrieve answered a non-array: ${show(res.data)}`)
  return { servers: res.data, server: res.data.find((s) => s.server_name === SERVER) }
}

const findApp = (server) =>
  server && server.data && Array.isArray(server.data.process)
    ? server.data.process.find((p) => p.name === APP)
    : undefined

async function main () {
  log(`km at ${KM_URL}, bucket ${BUCKET_ID}, server ${SERVER}, app ${APP}`)
  const km = new Keymetrics({ services: { API: KM_URL, OAUTH: KM_URL } })
    .use('standalone', { refresh_token: REFRESH_TOKEN, client_id: 'km-e2e-js-api' })

  // 1. Sign-in (requests are queued until the refresh token is exchanged and
  //    GET /api/bucket answered), then the bucket list.
  const signedIn = await check('sign-in (refresh token) + bucket.retrieveAll lists the bucket', async () => {
    const res = await km.bucket.retrieveAll()
    assert(Array.isArray(res.data), `bucket.retrieveAll answered a non-array: ${show(res.data)}`)
    const ids = res.data.map((b) => b._id)
    assert(ids.includes(BUCKET_ID), `bucket ${BUCKET_ID} not in bucket.retrieveAll: ${show(ids)}`)
    return `${res.data.length} bucket(s)`
  })
  if (!signedIn) {
    log('no sign-in: the client queues every request until POST /api/oauth/token (refresh_token ' +
      'grant) and then GET /api/bucket succeed, and reports their errors on stderr only; ' +
      'the other checks are skipped')
    return finish()
  }

  // 2. Status of the linked server.
  let restartTime0 = null
  await check('data.status.retrieve lists the server with the app', async () => {
    const { servers, server } = await serverEntry(km)
    assert(server, `no server ${SERVER} in data.status: ${show(servers.map((s) => s.server_name))}`)
    const app = findApp(server)
    assert(app, `server ${SERVER} does not list app ${APP}: ${show(server.data)}`)
    restartTime0 = typeof app.restart_time === 'number' ? app.restart_time : null
    return `pm_id ${app.pm_id}, status ${app.status}, restart_time ${app.restart_time}`
  })

  // 3. Logs.
  await check('data.logs.retrieve answers an array', async () => {
    const res = await km.data.logs.retrieve(BUCKET_ID, { app_name: APP, server_name: SERVER, size: 100 })
    assert(Array.isArray(res.data), `data.logs.retrieve answered a non-array: ${show(res.data)}`)
    if (LOG_NEEDLE) {
      const hit = res.data.some((e) => typeof e.data === 'string' && e.data.includes(LOG_NEEDLE))
      assert(hit, `no log line containing ${JSON.stringify(LOG_NEEDLE)} in ${show(res.data)}`)
    }
    return `${res.data.length} line(s)`
  })

  // 4. Restart through actions/triggerPM2. The mapping sends exactly
  //    {server_name, method_name, app_name} (all three mandatory strings; other fields dropped).
  const triggered = await check('actions.triggerPM2Action restart answers success', async () => {
    const res = await km.actions.triggerPM2Action(BUCKET_ID, {
      server_name: SERVER,
      method_name: 'restart',
      app_name: APP
    })
    assert(res.data && res.data.success === true, `triggerPM2Action answered ${show(res.data)}`)
    return show(res.data)
  })
  if (triggered && restartTime0 !== null) {
    await check('the restart shows in data.status (restart_time goes up)', async () => {
      const deadline = Date.now() + RESTART_TIMEOUT_MS - 1000
      let last = null
      while (Date.now() < deadline) {
        const app = findApp((await serverEntry(km)).server)
        if (app && typeof app.restart_time === 'number' && app.restart_time > restartTime0) {
          return `restart_time ${restartTime0} -> ${app.restart_time}, status ${app.status}`
        }
        last = app ? `restart_time ${app.restart_time}, status ${app.status}` : 'app missing'
        await sleep(250)
      }
      throw new CheckFailed(`restart_time still ${restartTime0} (last: ${last})`)
    }, RESTART_TIMEOUT_MS)
  } else if (triggered) {
    log('skip the restart effect check: no restart_time was read before the restart')
  }

  // 5. Realtime: /primus on the bucket's realtime endpoint.
  await check(`realtime: a status event of ${SERVER} within ${REALTIME_STATUS_MS} ms`, async () => {
    const bucket = (await km.bucket.retrieve(BUCKET_ID)).data
    const publicId = bucket && bucket.public_id
    assert(publicId, `bucket.retrieve has no public_id: ${show(bucket)}`)
    const seen = []
    km.realtime.onAny((event) => { if (!seen.includes(event)) seen.push(event) })
    const endpoint = bucket.node && bucket.node.endpoints
      ? bucket.node.endpoints.realtime || bucket.node.endpoints.web : undefined
    try {
      await withTimeout(km.realtime.subscribe(BUCKET_ID), SUBSCRIBE_TIMEOUT_MS,
        `realtime.subscribe (websocket to ${endpoint}/primus)`)
    } catch (e) {
      throw new CheckFailed(`${e.message}; realtime events seen: ${show(seen)}`)
    }
    const wanted = `${publicId}:${SERVER}:status`
    const payload = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new CheckFailed(
        `no ${wanted} event within ${REALTIME_STATUS_MS} ms after subscribing; realtime events seen: ${show(seen)}`
      )), REALTIME_STATUS_MS)
      km.realtime.on(`${publicId}:*:status`, function (data) {
        if (this.event !== wanted) return
        clearTimeout(timer)
        resolve(data)
      })
    })
    assert(payload !== null && typeof payload === 'object', `the status event carries ${show(payload)}`)
    const processes = payload.data && Array.isArray(payload.data.process) ? payload.data.process : null
    return processes ? `${processes.length} process(es)` : `keys ${show(Object.keys(payload))}`
  }, SUBSCRIBE_TIMEOUT_MS + REALTIME_STATUS_MS + STEP_TIMEOUT_MS)

  // 6. Alerts and notifications.
  await alerts(km)

  return finish()
}

async function alerts (km) {
  const alert = km.bucket.alert
  let id = null
  await check('bucket.alert.create makes a metric rule', async () => {
    const res = await alert.create(BUCKET_ID, {
      name: 'js-api busy',
      type: 'metric',
      initiator: 'cpu',
      options: { operator: '>', threshold: 95, timerange: 120 },
      scope: { apps: [APP], servers: [] },
      actions: [{ type: 'notify' }]
    })
    id = res.data && res.data._id
    assert(id && res.data.options.timerange === 120, `create answered ${show(res.data)}`)
    return id
  })
  if (!id) return
  await check('bucket.alert.list and get show it', async () => {
    const listed = (await alert.list(BUCKET_ID)).data
    assert(Array.isArray(listed) && listed.some((a) => a._id === id), `list: ${show(listed)}`)
    const got = (await alert.get(BUCKET_ID, id)).data
    assert(got.name === 'js-api busy' && Array.isArray(got.firing), `get: ${show(got)}`)
  })
  await check('bucket.alert.updateAlert changes the threshold', async () => {
    const res = await alert.updateAlert(BUCKET_ID, id, { options: { threshold: 99 } })
    assert(res.data.options.threshold === 99 && res.data.options.timerange === 120, `update: ${show(res.data)}`)
  })
  await check('bucket.alert.updateWebhooks answers the signing secret', async () => {
    const res = await alert.updateWebhooks(BUCKET_ID, { webhooks: { active: false, url: `${KM_URL}/no-hook` } })
    const secret = res.data && res.data.webhooks && res.data.webhooks.secret
    assert(typeof secret === 'string' && secret.length === 64, `updateWebhooks: ${show(res.data)}`)
  })
  await check('bucket.alert.triggerSample queues a test by mail', async () => {
    const res = await alert.triggerSample(BUCKET_ID, id)
    assert(res.data.success === true && res.data.channels.includes('email'), `sample: ${show(res.data)}`)
  })
  await check('data.notifications.list shows the sample', async () => {
    const res = await km.data.notifications.list(BUCKET_ID, {})
    assert(res.data.some((n) => n.kind === 'alert_sample' && n.channel === 'email'), `list: ${show(res.data)}`)
  })
  await check('bucket.setNotificationState stops the mail', async () => {
    const me = (await km.bucket.retrieveUsers(BUCKET_ID)).data[0]
    const res = await km.bucket.setNotificationState(BUCKET_ID, { email: me.email, state: 'none' })
    assert(res.data.every((m) => m.state === 'none'), `setNotificationState: ${show(res.data)}`)
  })
  await check('bucket.alert.delete removes it', async () => {
    await alert.delete(BUCKET_ID, id)
    const listed = (await alert.list(BUCKET_ID)).data
    assert(!listed.some((a) => a._id === id), `still listed: ${show(listed)}`)
  })
}

process.on('unhandledRejection', (e) => {
  log(`unhandled rejection: ${describe(e)}`)
})

main().catch((e) => {
  log(`FAIL (script error): ${describe(e)}`)
  process.exit(1)
})
