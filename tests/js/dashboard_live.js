'use strict'
// The dashboard tells the truth live (Debian's Chromium through playwright-core) against
// km, with a real pm2 running a cluster app on two instances, linked by the command the
// page shows. Run by tests/tests/dashboard.rs (`run_node_script`, NODE_PATH = the e2e
// node_modules).
//
// Steps, in one browser context with two tabs that are never reloaded until step 8:
//   1. sign up (the first account: admin), create a bucket, hand the link command to the
//      Rust test (`link-command.txt`), which links pm2 with it (`linked.json`);
//   2. the overview (tab 1) shows KM_APP_NAME's two instances online, and "2 processes";
//      the process page (tab 2) shows them too;
//   3. "scale +1" on the process page: pm2 (`jlist`, asked of the test), the API and both
//      tabs have exactly three instances, all online; the overview says "3 processes";
//   4. "scale -1": exactly two again; the removed instance's row leaves each tab within
//      ROW_GONE_MAX_MS of the API no longer listing it;
//   5. the test kills the agent (SIGKILL; daemon and apps keep running): within
//      OFFLINE_LAG_MAX_MS of the API's `online: false` both tabs show the server offline
//      and no process online; the overview says "0 processes";
//   6. both tabs reloaded: the server offline, its processes neither online nor with an
//      uptime, still "0 processes"; screenshots of both.
// Requests to the test: `request-<n>.json` ({"do": "instances"} or {"do": "kill-agent"}),
// answered in `reply-<n>.json`. Each step prints one line; on the first failure the
// script prints what failed, the page's console errors and a screenshot, and exits 1.
//
// Environment: KM_URL, KM_HANDSHAKE_DIR, KM_SCREENSHOT_DIR, KM_APP_NAME; optionally
// CHROMIUM (default /usr/bin/chromium) and KM_LINK_TIMEOUT_MS (default 120000).

const browser = require('./browser')

const b = browser.session({ prefix: 'dashboard-live', shotsDir: process.env.KM_SCREENSHOT_DIR || '.' })
const { assert, sleep, step, fail, StepFailed } = b

const KM_URL = b.required('KM_URL').replace(/\/+$/, '')
const HANDSHAKE_DIR = b.required('KM_HANDSHAKE_DIR')
b.required('KM_SCREENSHOT_DIR') // where the screenshots go (the session reads it)
const APP = b.required('KM_APP_NAME')
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const LINK_TIMEOUT_MS = Number(process.env.KM_LINK_TIMEOUT_MS || 120000)

const NAV_TIMEOUT_MS = 15000
// Generous bounds for a loaded 2-core machine; the measured lags are printed.
const ROWS_TIMEOUT_MS = 45000
const REQUEST_TIMEOUT_MS = 60000
const OFFLINE_TIMEOUT_MS = 45000
// What the dashboard promises once the API knows.
const ROW_GONE_MAX_MS = 2000
const OFFLINE_LAG_MAX_MS = 5000

const DESKTOP = { width: 1280, height: 800 }

let overview = null // tab 1
let proc = null // tab 2
let server = null
let statusUrl = null

// Runs in every page of the context (an init script: the pages' CSP forbids eval, so
// conditions are data, not code). `__kmView`: what the page shows of `server` and the
// instances of `app`, on the overview or the process page; `__kmMatch`: that view if it
// is as `want` says ({server, rows, minRows, online, uptime, processes}, each optional).
function installView () {
  window.__kmView = (server, app) => {
    const onProcessPage = !!document.querySelector('#server-state')
    const section = document.querySelector(`section.server[data-server="${CSS.escape(server)}"]`)
    const badge = onProcessPage ? document.querySelector('#server-state') : section && section.querySelector('h2 .badge')
    const scope = onProcessPage ? document.querySelector('table.processes') : section
    const rows = Array.from(scope ? scope.querySelectorAll('tr[data-key]') : [])
      .filter((r) => onProcessPage || r.querySelector('td a').textContent.trim() === app)
      .map((r) => ({
        key: r.dataset.key,
        status: r.querySelector('[data-field=status]').textContent.trim(),
        uptime: r.querySelector('[data-field=uptime]').textContent.trim()
      }))
    const usage = document.querySelector('#licence-usage')
    const count = usage && /^(\d+)/.exec(usage.textContent.trim())
    return {
      server: badge ? badge.textContent.trim() : 'not shown',
      rows,
      processes: count ? Number(count[1]) : null,
      live: (document.querySelector('#live-state') || {}).textContent
    }
  }
  window.__kmMatch = (server, app, want) => {
    const v = window.__kmView(server, app)
    const all = (f) => v.rows.every(f)
    const ok = (want.server === undefined || v.server === want.server) &&
      (want.rows === undefined || v.rows.length === want.rows) &&
      (want.minRows === undefined || v.rows.length >= want.minRows) &&
      (want.online === undefined || all((r) => (r.status === 'online') === want.online)) &&
      (want.uptime === undefined || all((r) => r.uptime === want.uptime)) &&
      (want.processes === undefined || v.processes === want.processes)
    return ok ? v : null
  }
}

const describe = ([server, app]) => JSON.stringify(window.__kmView(server, app))

// Waits until `page` shows what `want` says (see installView); returns the view and when
// it was seen.
async function waitView (page, what, timeoutMs, want) {
  const view = await b.waitIn(page, what, timeoutMs,
    ([server, app, want]) => window.__kmMatch(server, app, want), [server, APP, want], describe)
  return { view, at: Date.now() }
}

const keys = (view) => view.rows.map((r) => r.key).sort().join(', ')

// `n` rows of the app, all online, on a server shown online.
const onlineRows = (n) => ({ server: 'online', rows: n, online: true })

// The API's view of the server: online flag and the app's instances.
async function apiView () {
  const r = await overview.request.get(statusUrl)
  assert(r.ok(), `GET ${statusUrl}: HTTP ${r.status()}`)
  const s = (await r.json()).find((x) => x.server_name === server)
  assert(s, `the API does not list server ${server}`)
  const instances = ((s.data || {}).process || []).filter((p) => p.name === APP)
  return { online: s.online, keys: instances.map((p) => `${server}/${p.pm_id}`).sort() }
}

// Polls the API until `test(view)` holds; returns the view and when it was seen.
async function waitApi (what, timeoutMs, test) {
  const deadline = Date.now() + timeoutMs
  let last = null
  while (Date.now() < deadline) {
    last = await apiView()
    if (test(last)) return { view: last, at: Date.now() }
    await sleep(100)
  }
  throw new StepFailed(`${what}: not within ${timeoutMs} ms; the API says ${JSON.stringify(last)}`)
}

let requests = 0
// Asks the Rust test for something (see the header) and returns its reply.
async function ask (what) {
  requests += 1
  b.handOver(HANDSHAKE_DIR, `request-${requests}.json`, JSON.stringify({ do: what }))
  const reply = JSON.parse(await b.waitFile(HANDSHAKE_DIR, `reply-${requests}.json`, REQUEST_TIMEOUT_MS))
  assert(!reply.error, `the test could not do "${what}": ${reply.error}`)
  return reply
}

// `window.__kmMark` survives only as long as the document: a reload or navigation loses it.
const mark = (page) => page.evaluate(() => { window.__kmMark = Math.random().toString(36).slice(2); return window.__kmMark })
async function assertNotReloaded (marks, what) {
  for (const [page, token] of marks) {
    const now = await page.evaluate(() => window.__kmMark)
    assert(now === token, `${page === overview ? 'the overview' : 'the process page'} was reloaded or left during ${what}`)
  }
}

// Scales through the process page's button and waits for exactly `n` instances in pm2,
// the API and both tabs. Returns the API's view of the change and each tab's.
async function scale (button, n, before) {
  await proc.click(`#actions button:has-text("${button}")`)
  const [api, inOverview, inProcess] = await Promise.all([
    waitApi(`the API lists ${n} instances of ${APP}`, ROWS_TIMEOUT_MS, (v) => v.keys.length === n && v.keys.join() !== before.join()),
    ...[overview, proc].map((page) => waitView(page, `${n} online rows of ${APP}`, ROWS_TIMEOUT_MS, onlineRows(n)))
  ])
  const pm2 = await ask('instances')
  assert(pm2.instances === n, `pm2 jlist has ${pm2.instances} instances of ${APP} (pm_ids ${JSON.stringify(pm2.pm_ids)}), expected ${n}`)
  for (const tab of [inOverview, inProcess]) {
    assert(keys(tab.view) === api.view.keys.join(', '), `a tab shows ${keys(tab.view)}, the API ${api.view.keys.join(', ')}`)
  }
  return { api, inOverview, inProcess, pm2 }
}

async function signUpAndCreateBucket () {
  const username = `admin${Date.now().toString(36)}`
  await step('sign up as the first account (admin) and create a bucket', async () => {
    await overview.goto(`${KM_URL}/signup`)
    await overview.fill('input[name=username]', username)
    await overview.fill('input[name=email]', `${username}@example.com`)
    await overview.fill('input[name=password]', 'correct horse battery')
    await Promise.all([
      overview.waitForURL((u) => u.pathname === '/buckets'),
      overview.click('button:has-text("Sign up")')
    ])
    await overview.fill('input[name=name]', 'Live truth e2e')
    await Promise.all([
      overview.waitForURL((u) => /^\/buckets\/[0-9a-f]{24}$/.test(u.pathname)),
      overview.click('button:has-text("Create")')
    ])
    statusUrl = `${KM_URL}/api/bucket/${new URL(overview.url()).pathname.split('/')[2]}/data/status`
    return `${username}, ${overview.url()}`
  })
}

async function main () {
  const launched = await b.launch({ viewport: DESKTOP, timeoutMs: NAV_TIMEOUT_MS, chromiumPath: CHROMIUM })
  overview = launched.page
  await launched.context.addInitScript(installView)
  await signUpAndCreateBucket()

  await step('pm2 running a cluster app linked with the page\'s command (by the test)', async () => {
    const command = ((await overview.textContent('code#link-command')) || '').trim()
    assert(/^KEYMETRICS_NODE=\S+ pm2 link [0-9a-z]+ [0-9a-z]+$/.test(command), `code#link-command: ${JSON.stringify(command)}`)
    b.handOver(HANDSHAKE_DIR, 'link-command.txt', command)
    const linked = JSON.parse(await b.waitFile(HANDSHAKE_DIR, 'linked.json', LINK_TIMEOUT_MS))
    assert(!linked.error, `the test could not link pm2: ${linked.error}`)
    return `pm2 link exited ${linked.code}`
  })

  await step(`the overview shows ${APP}'s two instances online and "2 processes"`, async () => {
    const found = await b.waitIn(overview, 'a server section', ROWS_TIMEOUT_MS,
      () => { const s = document.querySelector('section.server'); return s && { server: s.dataset.server } }, null,
      () => document.querySelector('#servers').innerText.slice(0, 200))
    server = found.server
    const { view } = await waitView(overview, 'two online rows and "2 processes"', ROWS_TIMEOUT_MS,
      { ...onlineRows(2), processes: 2 })
    return `server ${server}: ${keys(view)}`
  })

  await step('the process page, in a second tab, shows them too', async () => {
    proc = b.track(await launched.context.newPage())
    const href = await overview.getAttribute(`section.server[data-server="${server}"] tr[data-key] td a`, 'href')
    await proc.goto(new URL(href, KM_URL).href)
    await b.waitIn(proc, '#live-state says "live"', NAV_TIMEOUT_MS,
      () => document.querySelector('#live-state').textContent === 'live', null,
      () => document.querySelector('#live-state').textContent)
    const { view } = await waitView(proc, 'two online rows', ROWS_TIMEOUT_MS, onlineRows(2))
    // The cpu chart: one line per instance and their sum, values shown on hover.
    const lines = await b.waitIn(proc, 'the cpu chart with a line per instance and the sum', ROWS_TIMEOUT_MS, () => {
      const fig = document.querySelector('figure.chart[data-metric="cpu"]')
      return fig && fig.dataset.lines && fig.dataset.lines.split(',').length === 3 ? fig.dataset.lines : null
    }, null, () => { const fig = document.querySelector('figure.chart[data-metric="cpu"]'); return fig ? `lines ${fig.dataset.lines}` : 'no cpu chart' })
    const labels = await proc.$$eval('figure.chart[data-metric="cpu"] .u-legend .u-label', (ls) => ls.map((l) => l.textContent.trim()))
    assert(labels.includes('sum') && labels.filter((l) => l.startsWith('pm_id ')).length === 2, `the cpu chart's legend: ${JSON.stringify(labels)}`)
    // Values under the pointer (the legend follows it; a live point may redraw meanwhile).
    // The legend is drawn in animation frames: only a tab in front has them.
    await proc.bringToFront()
    let hover = []
    for (let attempt = 0; attempt < 10 && !hover.some((v) => /\d/.test(v)); attempt++) {
      const over = await proc.$('figure.chart[data-metric="cpu"] .u-over')
      await over.scrollIntoViewIfNeeded()
      const at = await over.boundingBox()
      await proc.mouse.move(at.x + at.width * (0.5 + attempt / 25), at.y + at.height / 2, { steps: 5 })
      await sleep(200)
      hover = await proc.$$eval('figure.chart[data-metric="cpu"] .u-legend .u-value', (vs) => vs.map((v) => v.textContent.trim()))
    }
    assert(hover.some((v) => /\d/.test(v)), `no value under the pointer: ${JSON.stringify(hover)}`)
    await b.shot('process-cluster')
    return `${href}: ${keys(view)}; cpu lines ${lines}, legend ${JSON.stringify(labels)}, hover ${JSON.stringify(hover)}`
  })

  const marks = [[overview, await mark(overview)], [proc, await mark(proc)]]
  let two = (await apiView()).keys
  await step('"scale +1": exactly three instances in pm2, the API and both tabs, "3 processes"', async () => {
    const t0 = Date.now()
    const { api, inOverview, inProcess, pm2 } = await scale('scale +1', 3, two)
    await waitView(overview, '"3 processes"', ROWS_TIMEOUT_MS, { processes: 3 })
    await assertNotReloaded(marks, 'scale +1')
    return `pm2 ${JSON.stringify(pm2.pm_ids)}; API after ${api.at - t0} ms, overview ${inOverview.at - t0} ms, process page ${inProcess.at - t0} ms`
  })

  await step(`"scale -1": exactly two again, the removed row gone within ${ROW_GONE_MAX_MS} ms of the API, "2 processes"`, async () => {
    const three = (await apiView()).keys
    const t0 = Date.now()
    const { api, inOverview, inProcess, pm2 } = await scale('scale -1', 2, three)
    const removed = three.filter((k) => !api.view.keys.includes(k))
    assert(removed.length === 1, `the API went from ${three} to ${api.view.keys}`)
    const lags = [inOverview, inProcess].map((tab) => tab.at - api.at)
    assert(lags.every((lag) => lag <= ROW_GONE_MAX_MS),
      `row ${removed[0]} left the overview ${lags[0]} ms and the process page ${lags[1]} ms after the API (at most ${ROW_GONE_MAX_MS})`)
    await waitView(overview, '"2 processes"', ROWS_TIMEOUT_MS, { processes: 2 })
    await assertNotReloaded(marks, 'scale -1')
    two = api.view.keys
    return `removed ${removed[0]}; pm2 ${JSON.stringify(pm2.pm_ids)}; API after ${api.at - t0} ms; rows gone ${lags[0]} / ${lags[1]} ms after it`
  })

  await step(`the agent killed: both tabs show the server offline and no process online within ${OFFLINE_LAG_MAX_MS} ms of the API`, async () => {
    const notOnline = { server: 'offline', minRows: 1, online: false }
    let killed = null
    const [api, inOverview, inProcess] = await Promise.all([
      ask('kill-agent').then((reply) => {
        killed = reply
        return waitApi('the API says the server is offline', OFFLINE_TIMEOUT_MS, (v) => v.online === false)
      }),
      ...[overview, proc].map((page) => waitView(page, 'the server offline, no process online', OFFLINE_TIMEOUT_MS, notOnline))
    ])
    const lags = [inOverview, inProcess].map((tab) => tab.at - api.at)
    assert(lags.every((lag) => lag <= OFFLINE_LAG_MAX_MS),
      `offline on the overview ${lags[0]} ms and on the process page ${lags[1]} ms after the API (at most ${OFFLINE_LAG_MAX_MS})`)
    const count = await waitView(overview, '"0 processes"', ROWS_TIMEOUT_MS, { processes: 0 })
    await assertNotReloaded(marks, 'the kill')
    return `agent pid ${killed.pid}; API offline ${api.at - killed.at} ms after the kill; tabs ${lags[0]} / ${lags[1]} ms after the API; ` +
      `rows ${JSON.stringify(inOverview.view.rows)}; "0 processes" ${count.at - api.at} ms after the API`
  })

  await step('reloaded, both tabs show the server offline and its processes neither online nor with an uptime', async () => {
    const shown = []
    for (const page of [overview, proc]) {
      await page.reload()
      const { view } = await waitView(page, 'the server offline, its processes not online, no uptime', NAV_TIMEOUT_MS,
        { server: 'offline', rows: 2, online: false, uptime: '-' })
      shown.push(JSON.stringify(view.rows))
    }
    const { view } = await waitView(overview, '"0 processes"', NAV_TIMEOUT_MS, { processes: 0 })
    assert(keys(view) === two.join(', '), `the overview shows ${keys(view)}, the last status had ${two.join(', ')}`)
    await b.shot('overview-offline')
    b.page = proc // the failure screenshot (if any) and this one show the process page
    await b.shot('process-offline')
    b.page = overview
    return shown.join('; ')
  })

  await step('a second server with the app: the fleet shows it across both, the offline one first among problems', async () => {
    await ask('second-server')
    await overview.bringToFront()
    const fleet = await b.waitIn(overview, 'two servers in #hosts and the app on both in #apps', ROWS_TIMEOUT_MS, (app) => {
      const hosts = Array.from(document.querySelectorAll('#hosts tr[data-host]')).map((r) => r.dataset.host)
      const row = document.querySelector(`#apps tr[data-app="${CSS.escape(app)}"]`)
      const servers = row ? Array.from(row.querySelectorAll('.servers-cell a')).map((a) => a.textContent) : []
      const problems = Array.from(document.querySelectorAll('#problems li')).map((li) => li.dataset.kind + ' ' + li.querySelector('a').textContent)
      return hosts.length === 2 && servers.length === 2 && problems.length ? { hosts, servers, instances: row.querySelector('[data-field=instances]').textContent.trim(), problems } : null
    }, APP, () => `${(document.querySelector('#fleet') || { innerText: 'no #fleet' }).innerText.replace(/\s+/g, ' ').slice(0, 400)}`)
    assert(fleet.problems[0] === `offline ${server}`, `the first problem is ${JSON.stringify(fleet.problems[0])}, not ${server} offline`)
    assert(fleet.instances.startsWith('1/3 online'), `the app's instances read ${JSON.stringify(fleet.instances)}`)
    await b.shot('overview-two-servers')
    return `hosts ${JSON.stringify(fleet.hosts)}; ${APP} on ${JSON.stringify(fleet.servers)}: ${fleet.instances}; problems ${JSON.stringify(fleet.problems)}`
  })

  if (b.pageErrors.length) {
    await fail('no uncaught error in the pages', new StepFailed(`${b.pageErrors.length} uncaught error(s)`))
  }
  await b.finish()
}

main().catch((e) => fail('script error', e))
