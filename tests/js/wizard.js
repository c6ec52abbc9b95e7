'use strict'
// The setup wizard (km-wizard) in a real browser: Debian's Chromium through
// playwright-core. Run by tests/tests/wizard.rs (through `run_node_script`, NODE_PATH =
// the e2e node_modules), which starts the wizard and the servers it is checked against.
//
// The run is described by a JSON plan (file WIZARD_PLAN):
//   {
//     "name": "setup",                         // prefix of the screenshots
//     "url": "http://…/wizard/?token=…",       // the URL the wizard printed
//     "heading": "Set up this appliance",      // expected h1 of the form
//     "sections": [{
//       "id": "stores",                        // fieldset#id
//       "fill": [["stores", "external"], ["mongo_url", "mongodb://…"]],
//       "check": true,                         // press the section's Check
//       "expect": [{"status": "ok", "contains": "write, read and delete work"}],
//       "forbid": ["failed"]                   // no result of these statuses
//     }, …],
//     "apply": {                               // optional: press Apply, follow the progress
//       "succeeded": true, "heading": "Done", "contains": ["…"], "timeout_ms": 150000,
//       "then_status": 403                     // GET /wizard/ afterwards answers this
//     }
//   }
// Steps: open the URL (the token becomes a cookie and leaves the address bar), check the
// heading; per section fill the fields (radios, checkboxes and selects first, so the
// fields they reveal are visible), press Check, wait for the results and match them,
// screenshot the section; full-page screenshots of the form at 1280 and 390 px wide;
// Apply, screenshot the progress page, wait (through its own refreshes) until finished,
// screenshot it, match the outcome. Each step prints one line; on the first failure the
// script prints what failed, the page's console errors and a screenshot, and exits 1.
//
// Environment: WIZARD_PLAN, WIZARD_SCREENSHOT_DIR; optionally CHROMIUM.

const fs = require('fs')
const path = require('path')
const browser = require('./browser')

const missing = ['WIZARD_PLAN', 'WIZARD_SCREENSHOT_DIR'].filter((name) => !process.env[name])
if (missing.length) {
  console.error(`wizard: missing environment variable ${missing.join(', ')}`)
  process.exit(2)
}
const PLAN = JSON.parse(fs.readFileSync(process.env.WIZARD_PLAN, 'utf8'))
const NAME = PLAN.name || 'wizard'
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const b = browser.session({ prefix: 'wizard', shotsDir: process.env.WIZARD_SCREENSHOT_DIR, shotPrefix: `${NAME}-` })
const { log, assert, sleep, step, fail } = b
let page = null

const NAV_TIMEOUT_MS = 15000
// A section's checks: a few steps of 5 s each; an ACME trial order can take longer.
const CHECK_TIMEOUT_MS = 120000
const DESKTOP = { width: 1280, height: 900 }
const PHONE = { width: 390, height: 844 }

// Screenshot of the page, or of `target` (an element); returns the file's name.
async function shot (name, target) {
  return path.basename(await b.shot(name, { target }))
}

// Fills one field of the form by name, whatever its kind.
async function fillField (name, value) {
  const field = page.locator(`form#settings [name="${name}"]`)
  const count = await field.count()
  assert(count > 0, `the form has no field named ${name}`)
  const kind = await field.first().evaluate((el) => el.tagName === 'INPUT' ? el.type : el.tagName.toLowerCase())
  if (kind === 'radio') {
    await page.check(`form#settings input[name="${name}"][value="${value}"]`)
  } else if (kind === 'checkbox') {
    await field.first().setChecked(Boolean(value) && value !== 'off')
  } else if (kind === 'select') {
    await field.first().selectOption(String(value))
  } else {
    await field.first().fill(String(value))
  }
  return kind
}

// The results of a section as shown: [{status, text}].
const results = (id) => page.$$eval(`fieldset#${id} .results li`,
  (lis) => lis.map((li) => ({ status: li.className, text: li.textContent })))

async function section (s, index) {
  await step(`section ${s.id}: fill${s.check ? ' and check' : ''}`, async () => {
    const fieldset = page.locator(`fieldset#${s.id}`)
    assert(await fieldset.count() === 1, `no fieldset#${s.id} on the page`)
    const fill = s.fill || []
    const kinds = await Promise.all(fill.map(([name]) =>
      page.locator(`form#settings [name="${name}"]`).first().evaluate((el) => el.tagName === 'INPUT' ? el.type : el.tagName.toLowerCase())
        .catch(() => 'missing')))
    const choosers = ['radio', 'checkbox', 'select']
    for (const [i, [name, value]] of fill.entries()) if (choosers.includes(kinds[i])) await fillField(name, value)
    for (const [i, [name, value]] of fill.entries()) if (!choosers.includes(kinds[i])) await fillField(name, value)
    if (!s.check) {
      await fieldset.scrollIntoViewIfNeeded()
      return `${fill.length} fields; screenshot ${await shot(`${index}-${s.id}`, fieldset)}`
    }
    const t0 = Date.now()
    await fieldset.locator('button.check').click()
    try {
      await page.waitForFunction((id) => {
        const lis = Array.from(document.querySelectorAll(`fieldset#${id} .results li`))
        return lis.length > 0 && !lis.some((li) => li.classList.contains('running'))
      }, s.id, { timeout: CHECK_TIMEOUT_MS, polling: 200 })
    } catch (e) {
      throw new StepFailed(`no results within ${CHECK_TIMEOUT_MS} ms: ${JSON.stringify(await results(s.id))}`)
    }
    const found = await results(s.id)
    const shown = found.map((r) => `[${r.status}] ${r.text}`).join(' | ')
    for (const want of s.expect || []) {
      assert(found.some((r) => r.status === want.status && r.text.includes(want.contains)),
        `expected a "${want.status}" result containing ${JSON.stringify(want.contains)}; the page shows: ${shown}`)
    }
    for (const status of s.forbid || []) {
      assert(!found.some((r) => r.status === status), `a "${status}" result is shown: ${shown}`)
    }
    const file = await shot(`${index}-${s.id}`, fieldset)
    return `${Date.now() - t0} ms: ${shown}; screenshot ${file}`
  })
}

// What the progress page shows (null while it is being replaced by its refresh).
const progress = () => page.evaluate(() => {
  const main = document.querySelector('main#progress')
  if (!main) return null
  return {
    finished: main.dataset.finished,
    succeeded: main.dataset.succeeded,
    heading: (document.querySelector('h1') || {}).textContent,
    steps: Array.from(document.querySelectorAll('li.step')).map((li) => ({ state: li.className.replace('step', '').trim(), text: li.innerText.replace(/\s+/g, ' ') })),
    text: main.innerText,
    styled: getComputedStyle(document.body).backgroundColor !== 'rgba(0, 0, 0, 0)'
  }
}).catch(() => null)

async function main () {
  page = (await b.launch({ viewport: DESKTOP, timeoutMs: NAV_TIMEOUT_MS, chromiumPath: CHROMIUM })).page
  const base = new URL(PLAN.url).origin

  await step('open the setup URL from a link on another site', async () => {
    // As from a mail or a chat: a page of another origin links to the setup URL.
    await page.goto('data:text/html,' + encodeURIComponent(`<a id="setup" href="${PLAN.url}">setup</a>`))
    await Promise.all([page.waitForURL((u) => u.pathname === '/wizard/' && !u.search), page.click('#setup')])
    const url = new URL(page.url())
    assert(url.pathname === '/wizard/' && !url.search.includes('token'), `the token should leave the address bar: at ${page.url()}`)
    const cookies = await page.context().cookies(`${base}/wizard/`)
    const cookie = cookies.find((c) => c.name === 'km_wizard')
    assert(cookie && cookie.httpOnly && cookie.sameSite === 'Lax', `the token is not an HttpOnly, SameSite=Lax cookie: ${JSON.stringify(cookies)}`)
    const heading = (await page.textContent('h1')).trim()
    if (PLAN.heading) assert(heading === PLAN.heading, `heading ${JSON.stringify(heading)}, expected ${JSON.stringify(PLAN.heading)}`)
    const styled = await page.evaluate(() => getComputedStyle(document.querySelector('fieldset')).borderRadius)
    assert(styled === '8px', `the stylesheet is not applied (fieldset border-radius ${styled})`)
    return `"${heading}"`
  })

  for (const [i, s] of PLAN.sections.entries()) await section(s, i + 1)

  await step('screenshots of the whole form', async () => {
    const files = []
    for (const size of [DESKTOP, PHONE]) {
      await page.setViewportSize(size)
      await sleep(200)
      files.push(await shot(`form-${size.width}`))
    }
    await page.setViewportSize(DESKTOP)
    return files.join(', ')
  })

  const apply = PLAN.apply
  if (apply) {
    await step('apply', async () => {
      const invalid = await page.$$eval('form#settings :invalid', (els) => els.map((e) => `${e.name}: ${e.validationMessage}`))
      assert(invalid.length === 0, `the browser refuses the form: ${invalid.join('; ')}`)
      await Promise.all([
        page.waitForURL((u) => u.pathname === '/wizard/progress'),
        page.click('button.apply')
      ])
      const first = await progress()
      const file = await shot('progress')
      return `${first ? first.heading : '?'}; screenshot ${file}`
    })

    let last = null
    await step('follow the progress until it finishes', async () => {
      const deadline = Date.now() + (apply.timeout_ms || 150000)
      while (Date.now() < deadline) {
        const now = await progress()
        if (now) last = now
        if (now && now.finished === 'true') break
        await sleep(300)
      }
      assert(last && last.finished === 'true', `not finished within ${apply.timeout_ms} ms; the page shows: ${JSON.stringify(last)}`)
      // The finished page may have been read while its stylesheet was still loading.
      await page.waitForLoadState('load')
      last = (await progress()) || last
      const file = await shot(apply.succeeded ? 'done' : 'not-applied')
      return `"${last.heading}": ${last.steps.map((s) => `[${s.state}] ${s.text}`).join(' | ')}; screenshot ${file}`
    })

    await step('the outcome', async () => {
      const shown = JSON.stringify(last.text)
      assert(last.succeeded === String(Boolean(apply.succeeded)), `succeeded=${last.succeeded}, expected ${Boolean(apply.succeeded)}: ${shown}`)
      if (apply.heading) assert(last.heading.trim() === apply.heading, `heading ${JSON.stringify(last.heading)}, expected ${JSON.stringify(apply.heading)}`)
      if (apply.succeeded) {
        const notDone = last.steps.filter((s) => s.state !== 'done')
        assert(notDone.length === 0, `steps not done: ${JSON.stringify(notDone)}`)
      }
      for (const text of apply.contains || []) assert(last.text.includes(text), `the page does not say ${JSON.stringify(text)}: ${shown}`)
      assert(last.styled, 'the finished progress page has no stylesheet')
      return `${last.steps.length} steps`
    })
  }

  await step('no error in the pages', async () => {
    assert(b.pageErrors.length === 0, `uncaught errors: ${b.pageErrors.join('; ')}`)
    assert(b.consoleErrors.length === 0, `console errors: ${b.consoleErrors.join('; ')}`)
  })

  if (apply && apply.then_status) {
    await step(`GET /wizard/ now answers ${apply.then_status}`, async () => {
      const answer = await page.goto(`${base}/wizard/`)
      assert(answer.status() === apply.then_status, `GET /wizard/ answered ${answer.status()}: ${(await answer.text()).slice(0, 200)}`)
    })
  }

  await b.finish()
}

main().catch((e) => fail('script error', e))
