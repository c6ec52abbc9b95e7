'use strict'
// What the browser tests share: Debian's Chromium launched through playwright-core the
// way it runs here, steps that stop at the first failure (with a screenshot, the page's
// text and its console and uncaught errors), and screenshots kept in one directory.

const fs = require('fs')
const path = require('path')
const { chromium } = require('playwright-core')

class StepFailed extends Error {}

let axeSource = null

const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run']

// `prefix` starts every printed line; screenshots go to `shotsDir` as
// `<shotPrefix><name>.png`.
function session ({ prefix, shotsDir, shotPrefix = '' }) {
  const s = {
    page: null,
    browser: null,
    consoleErrors: [],
    pageErrors: [],
    screenshots: [],
    axeResults: [],
    StepFailed,
    log: (msg) => console.log(`${prefix}: ${msg}`),
    assert: (cond, message) => { if (!cond) throw new StepFailed(message) },
    sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms))
  }

  s.required = (name) => {
    const value = process.env[name]
    if (!value) {
      console.error(`${prefix}: missing environment variable ${name}`)
      process.exit(2)
    }
    return value
  }

  // A full-page screenshot, or of `target` (an element) when given.
  s.shot = async (name, { target, ...opts } = {}) => {
    const file = path.join(shotsDir, `${shotPrefix}${name}.png`)
    if (target) await target.screenshot({ path: file, ...opts })
    else await s.page.screenshot({ path: file, fullPage: true, ...opts })
    s.screenshots.push(file)
    return file
  }

  s.step = async (name, fn) => {
    const t0 = Date.now()
    try {
      const detail = await fn()
      s.log(`ok   ${name}${detail ? ` — ${detail}` : ''} (${Date.now() - t0} ms)`)
    } catch (e) {
      await s.fail(name, e, Date.now() - t0)
    }
  }

  s.fail = async (name, e, ms) => {
    const message = e instanceof StepFailed ? e.message : (e && e.stack) || String(e)
    s.log(`FAIL ${name}: ${message}${ms !== undefined ? ` (${ms} ms)` : ''}`)
    if (s.page) {
      try {
        s.log(`page url: ${s.page.url()}`)
        s.log(`failure screenshot: ${await s.shot(`failure-${name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()}`)}`)
        s.log(`page text: ${JSON.stringify((await s.page.innerText('body')).slice(0, 3000))}`)
      } catch (err) {
        s.log(`no failure screenshot (${err.message}); last one: ${s.screenshots[s.screenshots.length - 1] || 'none'}`)
      }
    }
    s.log(`console errors (${s.consoleErrors.length}): ${s.consoleErrors.length ? '\n  ' + s.consoleErrors.join('\n  ') : 'none'}`)
    s.log(`page errors (${s.pageErrors.length}): ${s.pageErrors.length ? '\n  ' + s.pageErrors.join('\n  ') : 'none'}`)
    if (s.browser) await s.browser.close().catch(() => {})
    process.exit(1)
  }

  // Screenshots of the current page at both sizes and in the dark at the desktop size,
  // each checked by axe-core (no serious or critical violation); back to the light desktop.
  s.shots = async (name, { desktop, phone }) => {
    const files = []
    const checked = []
    for (const [size, scheme] of [[desktop, 'light'], [phone, 'light'], [desktop, 'dark']]) {
      await s.page.setViewportSize(size)
      await s.page.emulateMedia({ colorScheme: scheme })
      await s.sleep(300) // let the layout (and uPlot's canvases) settle
      const suffix = `${size.width}x${size.height}${scheme === 'dark' ? '-dark' : ''}`
      files.push(await s.shot(`${name}-${suffix}`))
      if (size === desktop) checked.push(await s.axe(`${name}-${scheme}`))
      if (size === phone) await s.fitsWidth(name)
    }
    await s.page.setViewportSize(desktop)
    await s.page.emulateMedia({ colorScheme: 'light' })
    return `${files.map((f) => path.basename(f)).join(', ')}; ${checked.join('; ')}`
  }

  // Fails when the page is wider than the window (a phone scrolls sideways): names the
  // widest elements that stick out, outside of scrolling boxes.
  s.fitsWidth = async (name) => {
    const over = await s.page.evaluate(() => {
      const width = document.documentElement.clientWidth
      if (document.documentElement.scrollWidth <= width) return []
      const scrolls = (el) => {
        for (let p = el.parentElement; p; p = p.parentElement) {
          if (/(auto|scroll|hidden)/.test(getComputedStyle(p).overflowX)) return true
        }
        return false
      }
      return Array.from(document.querySelectorAll('body *'))
        .filter((el) => el.getBoundingClientRect().right > width + 1 && !scrolls(el))
        .map((el) => `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}${el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\s+/).join('.') : ''} (right ${Math.round(el.getBoundingClientRect().right)})`)
        .slice(0, 8)
    })
    if (over.length) throw new StepFailed(`${name} is wider than the phone's ${s.page.viewportSize().width} px: ${over.join(', ')}`)
  }

  // Runs axe-core's rules on the current page: the violations (every impact) go to
  // `<shotsDir>/<shotPrefix>axe-<name>.json` and into `axeResults`; a serious or critical
  // one fails the step. Runs through the DevTools protocol: the page's CSP does not apply.
  s.axe = async (name) => {
    if (!axeSource) axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8')
    await s.page.evaluate(axeSource)
    const result = await s.page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }))
    const violations = result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.length,
      targets: v.nodes.slice(0, 5).map((n) => n.target.join(' '))
    }))
    fs.writeFileSync(path.join(shotsDir, `${shotPrefix}axe-${name}.json`), JSON.stringify(violations, null, 2))
    s.axeResults.push({ page: name, violations })
    const blocking = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
    if (blocking.length) {
      throw new StepFailed(`axe on ${name}: ` + blocking.map((v) =>
        `${v.id} (${v.impact}, ${v.nodes} node(s): ${v.targets.join(', ')}): ${v.help}`).join('; '))
    }
    return `axe ${name}: ${violations.length ? violations.map((v) => `${v.id}/${v.impact}`).join(', ') : 'no violation'}`
  }

  // Starts Chromium with one context and page whose errors are recorded.
  s.launch = async ({ viewport, timeoutMs, chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium' }) => {
    fs.mkdirSync(shotsDir, { recursive: true })
    s.browser = await chromium.launch({ executablePath: chromiumPath, args: CHROMIUM_ARGS })
    const context = await s.browser.newContext({ viewport })
    context.setDefaultTimeout(timeoutMs)
    context.setDefaultNavigationTimeout(timeoutMs)
    s.page = s.track(await context.newPage())
    return { context, page: s.page }
  }

  // Records the console and uncaught errors of `page` (the launched one, or another tab).
  s.track = (page) => {
    page.on('console', (msg) => {
      if (msg.type() === 'error') s.consoleErrors.push(`${page.url()}: ${msg.text()}`)
    })
    page.on('pageerror', (err) => s.pageErrors.push(`${page.url()}: ${err.stack || err.message}`))
    return page
  }

  // Polls `fn` in `page` until it returns a truthy value, which it returns; the error
  // shows the last value of `describeFn` (also run in the page).
  s.waitIn = async (page, what, timeoutMs, fn, arg, describeFn) => {
    try {
      const handle = await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling: 100 })
      return await handle.jsonValue()
    } catch (e) {
      if (!/Timeout/i.test(String(e && e.message))) throw e
      const last = describeFn ? await page.evaluate(describeFn, arg).catch((err) => `(${err.message})`) : ''
      throw new StepFailed(`${what}: not within ${timeoutMs} ms${last ? `; page shows: ${last}` : ''}`)
    }
  }

  // Writes a file of `dir` that the Rust test polls for (atomically: it never sees half of it).
  s.handOver = (dir, name, text) => {
    const file = path.join(dir, name)
    fs.writeFileSync(`${file}.tmp`, text)
    fs.renameSync(`${file}.tmp`, file)
  }

  // Waits for the Rust test to write `dir/name`; returns its text.
  s.waitFile = async (dir, name, timeoutMs) => {
    const file = path.join(dir, name)
    const deadline = Date.now() + timeoutMs
    while (Date.now() < deadline) {
      if (fs.existsSync(file)) return fs.readFileSync(file, 'utf8')
      await s.sleep(100)
    }
    throw new StepFailed(`the test did not write ${file} within ${timeoutMs} ms`)
  }

  // The last lines of a passing run; closes the browser and exits 0.
  s.finish = async () => {
    s.log(`console errors: ${s.consoleErrors.length ? '\n  ' + s.consoleErrors.join('\n  ') : 'none'}`)
    s.log(`screenshots in ${shotsDir}: ${s.screenshots.map((f) => path.basename(f)).join(', ')}`)
    await s.browser.close()
    s.log('all steps passed')
    process.exit(0)
  }

  process.on('unhandledRejection', (e) => { s.log(`unhandled rejection: ${(e && e.stack) || e}`) })
  return s
}

module.exports = { session, StepFailed }
